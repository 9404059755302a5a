"""tritonmoe.fused_experts (fused and unfused) vs reference.fused_experts."""
import dataclasses
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import tritonmoe
from tritonmoe import functional, reference
from tritonmoe.gemm import _interleaved, _tile_position
from conftest import assert_close, dtypes_for, random_topk_ids
from helpers import EK, TOKENS

H, F = 40, 24  # not multiples of any block size


def make_inputs(T, k, E, device, dtype, *, H=H, F=F, ids=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype).to(device)
    w13 = (torch.randn(E, 2 * F, H, generator=g) / H ** 0.5).to(dtype).to(device)
    w2 = (torch.randn(E, H, F, generator=g) / F ** 0.5).to(dtype).to(device)
    ids = random_topk_ids(T, k, E, device, g) if ids is None else ids.to(device)
    weights = torch.rand(T, k, generator=g).to(device)
    return x, w13, w2, weights, ids


def check(x, w13, w2, weights, ids, *, fused=True, **kw):
    out = tritonmoe.fused_experts(x, w13, w2, weights, ids, fused=fused, **kw)
    ref = reference.fused_experts(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
    assert out.dtype == x.dtype and out.device == x.device
    assert_close(out, ref, x.dtype, f"fused={fused}")


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("E,k", EK)
def test_grid_fused_fp32(E, k, T, device, poison):
    check(*make_inputs(T, k, E, device, torch.float32, seed=E + k + T))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("T", [1, 17, 300])
@pytest.mark.parametrize("E,k", [(1, 1), (8, 2), (64, 8)])
def test_grid_dtypes(E, k, T, fused, device, poison):
    for dtype in dtypes_for(device):
        check(*make_inputs(T, k, E, device, dtype, seed=7), fused=fused)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_larger_odd_shapes(fused, device, poison):
    # H, F spanning several N- and K-blocks, neither a multiple of 16
    for dtype in dtypes_for(device):
        check(*make_inputs(45, 2, 8, device, dtype, H=200, F=136), fused=fused)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("split_k", [1, 4])
@pytest.mark.parametrize("block_m", [16, 32])
def test_explicit_tiles(block_m, split_k, tma, device, poison):
    # tiles as a tuned table would give them, split-K on the down projection included; F = 80 is
    # no multiple of block_n, so TMA weight tiles read past an expert's rows (never stored)
    up = tritonmoe.TileConfig(block_m=block_m, block_n=32, block_k=32, group_m=2, num_stages=2, tma=tma)
    down = tritonmoe.TileConfig(block_m=block_m, block_n=16, block_k=16, group_m=1, num_stages=2, split_k=split_k,
                                tma=tma)
    for fused in (True, False):
        for dtype in dtypes_for(device):
            check(*make_inputs(21, 2, 8, device, dtype, H=64, F=80), tiles=(up, down), fused=fused)


@pytest.mark.parametrize("one_dot", [True, False], ids=["one-dot", "two-dots"])
@pytest.mark.parametrize("absorb_m", [0, 16])
def test_gate_up_one_dot_or_two(one_dot, absorb_m, device, poison):
    # TMA gate+up tiles: one (2, block_n, block_k) box and one dot (the default) or two dots; F = 80 is no
    # multiple of block_n = 32, so the box's last columns are past F (zero-filled, never stored)
    up = tritonmoe.TileConfig(block_m=32, block_n=32, block_k=32, group_m=2, num_stages=2, tma=True,
                              absorb_m=absorb_m, min_block_m=16, gate_up_one_dot=one_dot)
    down = tritonmoe.TileConfig(block_m=32, block_n=16, block_k=16, group_m=1, num_stages=2, absorb_m=absorb_m)
    for dtype in dtypes_for(device):
        check(*make_inputs(77, 2, 8, device, dtype, H=64, F=80), tiles=(up, down))
        # the persistent walk of full-height tiles runs the same tile code
        pers = dataclasses.replace(up, persistent=True, absorb_m=0, min_block_m=0)
        check(*make_inputs(77, 2, 8, device, dtype, H=64, F=80), tiles=(pers, dataclasses.replace(down, absorb_m=0)))


def test_gate_up_descriptor_is_one_box_of_gate_and_up_rows():
    from tritonmoe.gemm import _gate_up_descriptor
    w13 = torch.randn(3, 2 * 48, 64, dtype=torch.float16)
    d = _gate_up_descriptor(w13, 16, 32)
    assert d.block_shape == [2, 16, 32] and list(d.shape) == [6, 48, 64] and list(d.strides) == [48 * 64, 64, 1]
    # box (2e, n, k) holds gate row n and up row n of expert e
    assert torch.equal(w13.view(6, 48, 64)[2 * 1 + 1, 5], w13[1, 48 + 5])
    assert _gate_up_descriptor(w13.transpose(1, 2).contiguous().transpose(1, 2), 16, 32) is None  # strided


def test_permuted_gate_up_inputs_through_tma_with_either_weight_tile(monkeypatch, device, poison):
    # tiles.permute_input puts the input rows in expert order so that TMA can load them: with the one-dot
    # gate+up box as with two dots, the launch builds the input's descriptor (it once did for two dots only)
    from tritonmoe import gemm
    seen = []
    real = gemm._descriptor
    monkeypatch.setattr(gemm, "_descriptor", lambda t, block: seen.append(tuple(block)) or real(t, block))
    down = tritonmoe.TileConfig(block_m=32, block_n=16, block_k=16, num_stages=2)  # no TMA: no descriptor
    for one_dot in (True, False):
        up = tritonmoe.TileConfig(block_m=32, block_n=16, block_k=32, num_stages=2, tma=True, permute_input=True,
                                  gate_up_one_dot=one_dot)
        for dtype in dtypes_for(device):
            seen.clear()
            check(*make_inputs(40, 2, 4, device, dtype, H=64, F=48), tiles=(up, down))
            assert (32, 32) in seen, (one_dot, seen)  # (block_m, block_k): the input's tiles; weights' are (16, 32)


@pytest.mark.parametrize("blocks", [(16, 32), (64, 16)], ids=["gate_up16-down32", "gate_up64-down16"])
def test_block_m_per_gemm(blocks, device, poison):
    # each GEMM with its own M-blocks: the down projection gets its own block map over the same rows
    up = tritonmoe.TileConfig(block_m=blocks[0], block_n=32, block_k=32, group_m=2, num_stages=2)
    down = tritonmoe.TileConfig(block_m=blocks[1], block_n=32, block_k=32, group_m=2, num_stages=2)
    for fused in (True, False):
        for dtype in dtypes_for(device):
            check(*make_inputs(150, 2, 8, device, dtype, H=64, F=48), tiles=(up, down), fused=fused)


@pytest.mark.parametrize("H,F", [(40, 24), (41, 24), (40, 23)], ids=["aligned", "odd-H", "odd-F"])
def test_tma_tiles_any_shape(H, F, device, poison):
    # rows of 41 or 23 half-precision values are not 16-byte multiples: the copy engine cannot take
    # them, and those GEMMs fall back to pointer loads; strided weights likewise
    tiles = tritonmoe.TileConfig(block_m=16, block_n=16, block_k=32, group_m=2, num_stages=2, tma=True)
    for fused in (True, False):
        check(*make_inputs(37, 2, 8, device, torch.float16, H=H, F=F), tiles=(tiles, tiles), fused=fused)
    x, w13, w2, weights, ids = make_inputs(19, 2, 8, device, torch.float16, H=H, F=F)
    check(x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2, weights, ids, tiles=(tiles, tiles))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_all_tokens_one_expert(fused, device, poison):
    ids = torch.full((150, 1), 3, dtype=torch.int32)
    check(*make_inputs(150, 1, 8, device, torch.float32, ids=ids), fused=fused)


def test_most_experts_empty(device, poison):
    # E = 256, every token on two of experts {0, 17, 255}
    ids = torch.tensor([[0, 17], [255, 0], [17, 255]], dtype=torch.int32).repeat(30, 1)
    check(*make_inputs(90, 2, 256, device, torch.float32, ids=ids))


def test_one_token_per_expert(device, poison):
    ids = torch.arange(64, dtype=torch.int32).view(64, 1)
    check(*make_inputs(64, 1, 64, device, torch.float32, ids=ids))


def _ids_from_counts(counts, seed=0):
    """(sum(counts), 1) ids: expert e on counts[e] tokens, tokens in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return ids[torch.randperm(len(ids), generator=g)].to(torch.int32).view(-1, 1)


# Routing extremes for both schedules (issue #7): (T, k, E, ids).
EXTREMES = {
    "all-on-one-expert": (200, 1, 16, torch.full((200, 1), 5, dtype=torch.int32)),
    "one-token-per-expert": (64, 1, 64, torch.arange(64, dtype=torch.int32).view(64, 1)),
    "E256-most-empty": (90, 2, 256, torch.tensor([[0, 17], [255, 0], [17, 255]], dtype=torch.int32).repeat(30, 1)),
    # partial blocks of every height: counts just under, at and over each power of two up to 2 x 128
    "every-tail-height": (None, 1, 12, _ids_from_counts([1, 16, 17, 32, 33, 64, 65, 81, 97, 128, 129, 200])),
}


# (schedule, min_block_m): full-height tiles and tail tiles down to 16 rows for both group orders;
# "tail_tiles" sets 16 itself where the tiles set 0
SCHEDULE_TAILS = [("expert_groups", 0), ("expert_groups", 16), ("fixed", 0), ("fixed", 16), ("tail_tiles", 0)]


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("schedule,min_block_m", SCHEDULE_TAILS, ids=[f"{s}-tail{m}" for s, m in SCHEDULE_TAILS])
@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize("case", EXTREMES)
def test_schedule_extremes(case, block_m, schedule, min_block_m, tma, device, poison):
    T, k, E, ids = EXTREMES[case]
    T = ids.shape[0]
    # group_m=3: groups of blocks end inside an expert, at its end and (fixed) across two experts; on a
    # GPU expert groups take at least as many blocks as half of L2 holds rows for, so there they end at it
    tiles = tritonmoe.TileConfig(block_m=block_m, block_n=32, block_k=32, group_m=3, num_stages=2,
                                 min_block_m=min_block_m, tma=tma)
    for dtype in dtypes_for(device):
        check(*make_inputs(T, k, E, device, dtype, ids=ids), tiles=(tiles, tiles), schedule=schedule)


# 256-row M-blocks (an expert of ~256 rows in one block): an expert's last block takes any of five heights,
# 256 down to 16; counts from 1 to 200 put a partial block at each of them.
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("min_block_m", [0, 16])
def test_block_m_256_every_tail_height(min_block_m, tma, device, poison):
    T, k, E, ids = EXTREMES["every-tail-height"]
    tiles = tritonmoe.TileConfig(block_m=256, block_n=32, block_k=32, group_m=3, num_stages=2,
                                 min_block_m=min_block_m, tma=tma)
    for dtype in dtypes_for(device):
        check(*make_inputs(ids.shape[0], k, E, device, dtype, ids=ids), tiles=(tiles, tiles))


# Absorbed tails: an expert's last whole block also runs the rows after it (up to absorb_m) as a second
# tile. "every-tail-height" has counts 1 to 33 rows past a whole 16/32/64/128-row block; with and without
# tail tiles for the blocks that absorb nothing, both GEMMs, both group orders.
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("schedule,min_block_m", [("expert_groups", 0), ("expert_groups", 16), ("fixed", 0)])
@pytest.mark.parametrize("block_m,absorb_m", [(32, 16), (64, 32), (128, 64)])
def test_absorbed_tails(block_m, absorb_m, schedule, min_block_m, tma, device, poison):
    T, k, E, ids = EXTREMES["every-tail-height"]
    tiles = tritonmoe.TileConfig(block_m=block_m, block_n=32, block_k=32, group_m=3, num_stages=2,
                                 min_block_m=min_block_m, absorb_m=absorb_m, tma=tma)
    for dtype in dtypes_for(device):
        check(*make_inputs(ids.shape[0], k, E, device, dtype, ids=ids), tiles=(tiles, tiles), schedule=schedule)


def test_persistent_refuses_absorbing_blocks(device):
    x, w13, w2, weights, ids = make_inputs(40, 2, 4, device, torch.float32)
    sched = tritonmoe.build_schedule(ids, 4, 32, absorb_m=16)
    tiles = tritonmoe.TileConfig(block_m=32, block_n=32, block_k=32, persistent=True)
    with pytest.raises(ValueError, match="persistent=True runs full-height tiles only; this schedule's blocks absorb"):
        tritonmoe.gate_up_silu(x, w13, sched, tiles)


# Interleaved tiles: the schedule lays out experts with several M-blocks before those with one, and the programs
# take the one-block experts' tiles from the end of that list spread among the others' from its front. Every
# extreme: one expert only (all busy), one row per expert (none busy), both kinds.
INTERLEAVE = {  # (tile fields, schedule): the preprint's consecutive groups too (the skew grid's tritonmoe_fixed)
    "grid": (dict(), "expert_groups"),
    "grid-tails-absorb": (dict(min_block_m=16, absorb_m=16), "expert_groups"),
    "tma": (dict(tma=True), "expert_groups"),
    "persistent": (dict(persistent=True), "expert_groups"),
    "fixed-groups": (dict(), "fixed"),
    "fixed-groups-persistent": (dict(persistent=True), "fixed"),
}


@pytest.mark.parametrize("variant", INTERLEAVE)
@pytest.mark.parametrize("case", ["all-on-one-expert", "one-token-per-expert", "every-tail-height"])
def test_interleaved_tiles(case, variant, device, poison):
    T, k, E, ids = EXTREMES[case]
    fields, schedule = INTERLEAVE[variant]
    tiles = tritonmoe.TileConfig(block_m=32, block_n=32, block_k=32, group_m=3, num_stages=2, interleave=True,
                                 **fields)
    for dtype in dtypes_for(device):
        check(*make_inputs(ids.shape[0], k, E, device, dtype, ids=ids), tiles=(tiles, tiles), schedule=schedule)


@pytest.mark.parametrize("persistent", [False, True])
def test_interleaved_tiles_many_rounds(persistent, device, poison):
    # more tiles than two rounds of the GPU's programs (132 on an H100), one-block experts among busy ones
    tiles = tritonmoe.TileConfig(block_m=16, block_n=16, block_k=32, group_m=2, num_stages=2, interleave=True,
                                 persistent=persistent)
    ids = _ids_from_counts([400, 10, 300, 5, 16, 250, 1, 14])  # experts 0, 2, 5 busy, the rest one block each
    for dtype in dtypes_for(device):
        check(*make_inputs(ids.shape[0], 1, 8, device, dtype, ids=ids, H=48, F=160, seed=3), tiles=(tiles, tiles))


@triton.jit
def _interleaved_walk_kernel(out_ptr, n, back, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, _interleaved(i, n, back), mask=i < n)


@pytest.mark.parametrize("n,back", [(1, 0), (1, 1), (7, 0), (7, 7), (10, 3), (97, 40), (658 + 1708, 658)])
def test_interleaved_order_spreads_the_back_tiles(n, back, device):
    # the walk's order itself: a permutation of the n tiles in which, after any i of them, floor(i * back / n) came
    # from the list's last `back` (in reverse) and the rest from its front (in order); the last case is E = 64,
    # T = 2048, s = 2's gate+up (658 one-block experts' tiles, 1708 busy ones)
    out = torch.full((n,), -1, dtype=torch.int32, device=device)
    _interleaved_walk_kernel[(-(-n // 256),)](out, n, back, BLOCK=256)
    order = out.cpu().tolist()
    assert sorted(order) == list(range(n))
    from_back = [t >= n - back for t in order]
    assert [sum(from_back[:i]) for i in range(n + 1)] == [i * back // n for i in range(n + 1)]
    assert [t for t in order if t < n - back] == list(range(n - back))
    assert [t for t in order if t >= n - back] == list(range(n - 1, n - back - 1, -1))


# The expert-group walk (gemm._tile_position) against a Python statement of it: an expert's blocks GROUP_M at a time
# and the rest, each group sweeping N with M fastest.
def _expected_walk(blocks_per_expert, group, num_pid_n):
    walk, first = [], 0
    for n in blocks_per_expert:
        for size in [group] * (n // group) + ([n % group] if n % group else []):
            walk += [(first + local % size, local // size) for local in range(size * num_pid_n)]
            first += size
    return walk


@triton.jit
def _tile_position_kernel(out_ptr, rank_ptr, siblings_ptr, num_tiles, num_pid_n, max_blocks, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    if pid < num_tiles:
        m, n = _tile_position(pid, num_pid_n, max_blocks, rank_ptr, siblings_ptr, GROUP_M, True, 0)
        tl.store(out_ptr + 2 * pid, m)
        tl.store(out_ptr + 2 * pid + 1, n)


def test_expert_groups_walk(device):
    # 54 blocks at a cap of 50 (E = 16, T = 8192's second-busiest expert under Zipf 1: 50 + 4), 7 at 3 (3 + 3 + 1),
    # one-block and exactly-divisible experts
    for blocks, group, num_pid_n in (([54, 1, 50, 100, 3], 50, 3), ([7, 1, 3, 6, 2, 5], 3, 4)):
        rank = torch.tensor([r for n in blocks for r in range(n)], dtype=torch.int32, device=device)
        siblings = torch.tensor([n for n in blocks for _ in range(n)], dtype=torch.int32, device=device)
        num_tiles = sum(blocks) * num_pid_n
        out = torch.full((num_tiles, 2), -1, dtype=torch.int32, device=device)
        _tile_position_kernel[(num_tiles,)](out, rank, siblings, num_tiles, num_pid_n, sum(blocks), GROUP_M=group)
        want = _expected_walk(blocks, group, num_pid_n)
        assert sorted(want) == [(m, n) for m in range(sum(blocks)) for n in range(num_pid_n)]  # every tile once
        assert [tuple(t) for t in out.cpu().tolist()] == want


def test_interleave_refusals(device):
    x, w13, w2, weights, ids = make_inputs(40, 2, 4, device, torch.float32)
    tiles = tritonmoe.TileConfig(block_m=16, block_n=32, block_k=32, interleave=True)
    with pytest.raises(ValueError, match="interleave walks a busy-first block list"):
        tritonmoe.gate_up_silu(x, w13, tritonmoe.build_schedule(ids, 4, 16), tiles)
    with pytest.raises(ValueError, match="a slot schedule has none"):
        tritonmoe.gate_up_silu(x, w13, tritonmoe.slot_schedule(ids, 4), tiles)
    with pytest.raises(ValueError, match="TileConfig.interleave walks the M-blocks from both ends; sweep_n=2"):
        tritonmoe.TileConfig(interleave=True, sweep_n=2)
    # the forward builds the busy-first schedule itself, also where it would run a slot schedule (T <= 2)
    check(*make_inputs(2, 2, 4, device, torch.float32), tiles=(tiles, tiles))


# Persistent programs (a few on the CPU, one per SM on a GPU) each walk many tiles, with the gate+up
# input gathered per tile or copied into expert order first (TMA-loadable).
PERSISTENT = {
    "persistent": dict(persistent=True),
    "persistent-tma-permuted": dict(persistent=True, tma=True, permute_input=True),
    "permuted": dict(permute_input=True, tma=True),
}


@pytest.mark.parametrize("schedule", ["expert_groups", "fixed"])
@pytest.mark.parametrize("variant", PERSISTENT)
@pytest.mark.parametrize("case", ["all-on-one-expert", "E256-most-empty", "every-tail-height"])
def test_persistent_tiles(case, variant, schedule, device, poison):
    T, k, E, ids = EXTREMES[case]
    tiles = tritonmoe.TileConfig(block_m=32, block_n=32, block_k=32, group_m=3, num_stages=2, **PERSISTENT[variant])
    for dtype in dtypes_for(device):
        check(*make_inputs(ids.shape[0], k, E, device, dtype, ids=ids), tiles=(tiles, tiles), schedule=schedule)


# N swept a few tiles at a time over all M-blocks: slices of one N-tile, of two with a last slice of one
# (block_n=32 over F=48 and H=80: 2 and 3 N-tiles), and whole; the grid's surplus programs exit.
@pytest.mark.parametrize("sweep_n", [1, 2, 8])
@pytest.mark.parametrize("schedule", ["expert_groups", "fixed"])
@pytest.mark.parametrize("case", ["all-on-one-expert", "E256-most-empty", "every-tail-height"])
def test_sweep_n(case, schedule, sweep_n, device, poison):
    T, k, E, ids = EXTREMES[case]
    tiles = tritonmoe.TileConfig(block_m=32, block_n=32, block_k=32, group_m=3, num_stages=2, sweep_n=sweep_n)
    for dtype in dtypes_for(device):
        check(*make_inputs(ids.shape[0], k, E, device, dtype, ids=ids, H=80, F=48), tiles=(tiles, tiles),
              schedule=schedule)


@pytest.mark.parametrize("schedule,min_block_m", [("expert_groups", 16), ("tail_tiles", 0)])
def test_persistent_needs_full_tiles(schedule, min_block_m, device):
    tiles = tritonmoe.TileConfig(block_m=32, block_n=32, block_k=32, min_block_m=min_block_m, persistent=True)
    with pytest.raises(ValueError, match="persistent=True runs full-height tiles only: min_block_m must be 0 or"):
        tritonmoe.fused_experts(*make_inputs(40, 2, 8, device, torch.float32), tiles=(tiles, tiles),
                                schedule=schedule)


# Slot schedules (every slot its own one-row M-block, no schedule built): what up to
# SLOT_SCHEDULE_MAX_TOKENS tokens run by default, and schedule="slots" at any T, where tokens share
# experts (the same expert in many blocks).
SLOT_CASES = {
    "T1-E256-k8": (torch.tensor([[255, 0, 17, 3, 128, 64, 200, 1]]), 256),
    "T1-E8-k2-int64": (torch.tensor([[7, 2]], dtype=torch.int64), 8),
    "T2-shared-expert": (torch.tensor([[1, 3], [3, 0]], dtype=torch.int32), 4),
    "T5-shared-experts": (torch.tensor([[1, 3], [3, 1], [1, 0], [3, 1], [1, 2]]), 4),
    "all-on-one-expert": (torch.full((40, 1), 5, dtype=torch.int32), 16),
}


@pytest.fixture
def built(monkeypatch):
    """The arguments of every schedule the forward builds (build_schedule calls), in order."""
    calls = []
    monkeypatch.setattr(functional, "build_schedule", lambda *a: calls.append(a) or tritonmoe.build_schedule(*a))
    return calls


@pytest.mark.parametrize("down", [dict(), dict(split_k=3), dict(tma=True)], ids=["plain", "split3", "tma"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", SLOT_CASES)
def test_slot_schedule(case, fused, down, device, poison, built):
    ids, E = SLOT_CASES[case]
    T, k = ids.shape
    gate_up = tritonmoe.TileConfig(block_m=32, block_n=32, block_k=32, num_stages=2, tma=down.get("tma", False))
    tiles = (gate_up, tritonmoe.TileConfig(block_m=64, block_n=32, block_k=32, num_stages=2, **down))
    by_default = T <= functional.SLOT_SCHEDULE_MAX_TOKENS
    for dtype in dtypes_for(device):
        # up to SLOT_SCHEDULE_MAX_TOKENS tokens run a slot schedule by default; more tokens ask for it
        check(*make_inputs(T, k, E, device, dtype, ids=ids), fused=fused, tiles=tiles,
              schedule="expert_groups" if by_default else "slots")
    assert not built, "a slot schedule builds no schedule"
    if not by_default:  # and the default builds one there
        check(*make_inputs(T, k, E, device, torch.float32, ids=ids), fused=fused, tiles=tiles)
        assert built


def test_slot_schedule_needs_no_block_walk(device, poison, built):
    # persistent tiles walk a built schedule's blocks: refused for schedule="slots", and a single token
    # with them by default gets a built schedule instead
    tiles = tritonmoe.TileConfig(block_m=32, block_n=32, block_k=32, persistent=True)
    with pytest.raises(ValueError, match="a slot schedule has none"):
        tritonmoe.fused_experts(*make_inputs(3, 2, 8, device, torch.float32), tiles=(tiles, tiles), schedule="slots")
    check(*make_inputs(1, 2, 8, device, torch.float32), tiles=(tiles, tiles))
    assert built


# The down projection adding each weighted row into its token's output row with atomics (no combine):
# every token's k rows meet in one row from many programs; with split-K partials, TMA, persistent programs,
# the preprint's group order and a slot schedule; a chunked forward hands it a slice of a poisoned output,
# which it must zero first. (case, schedule, down tiles, chunk_tokens): each lever once, on the interpreter's budget.
ATOMIC_CASES = {
    "tails-groups": ("every-tail-height", "expert_groups", dict(), None),
    "tails-groups-chunked": ("every-tail-height", "expert_groups", dict(), 64),
    "E256-fixed-split3": ("E256-most-empty", "fixed", dict(split_k=3), None),
    "one-expert-tma": ("all-on-one-expert", "expert_groups", dict(tma=True), None),
    "one-expert-persistent": ("all-on-one-expert", "expert_groups", dict(persistent=True), None),
    "E256-slots": ("E256-most-empty", "slots", dict(), None),
}


@pytest.mark.parametrize("case", ATOMIC_CASES)
def test_atomic_combine(case, device, poison):
    extreme, schedule, down, chunk = ATOMIC_CASES[case]
    T, k, E, ids = EXTREMES[extreme]
    gate_up = tritonmoe.TileConfig(block_m=32, block_n=32, block_k=32, group_m=3, num_stages=2)
    tiles = (gate_up, dataclasses.replace(gate_up, atomic_combine=True, **down))
    for dtype in dtypes_for(device):
        check(*make_inputs(ids.shape[0], k, E, device, dtype, ids=ids), tiles=tiles, schedule=schedule,
              chunk_tokens=chunk)


# Tiles under 64 rows computing the transposed product (weights as the MMA's M): tail tiles of every height
# under full 64- and 128-row tiles (pointer loads; TMA with the gate+up's one-dot box), 32-row blocks
# throughout, the unfused pipeline's plain projections; absorbed tails and slot schedules keep the usual product.
SWAP_CASES = {
    "tails-64": (dict(block_m=64, min_block_m=16), True, "expert_groups"),
    "tails-128-tma": (dict(block_m=128, min_block_m=16, tma=True), True, "expert_groups"),
    "blocks-32-unfused": (dict(block_m=32), False, "fixed"),
    "blocks-32-tma-absorb": (dict(block_m=32, tma=True, absorb_m=16), True, "expert_groups"),
    "slots": (dict(block_m=32), True, "slots"),
}


@pytest.mark.parametrize("case", SWAP_CASES)
def test_swap_ab_tiles(case, device, poison):
    fields, fused, schedule = SWAP_CASES[case]
    # a slot schedule runs one block per slot: a few tokens keep the interpreter's run short
    ids, E = SLOT_CASES["T5-shared-experts"] if schedule == "slots" else (EXTREMES["every-tail-height"][3], 12)
    tiles = tritonmoe.TileConfig(block_n=32, block_k=32, group_m=3, num_stages=2, swap_ab=True, **fields)
    for dtype in dtypes_for(device):
        check(*make_inputs(ids.shape[0], ids.shape[1], E, device, dtype, ids=ids, H=80, F=48), fused=fused,
              tiles=(tiles, tiles), schedule=schedule)


def test_atomic_combine_refusals(device):
    x, w13, w2, weights, ids = make_inputs(9, 2, 4, device, torch.float32)
    plain = tritonmoe.TileConfig(block_m=16, block_n=32, block_k=32)
    atomic = dataclasses.replace(plain, atomic_combine=True)
    sched = tritonmoe.build_schedule(ids, 4, 16)
    with pytest.raises(ValueError, match=r"the gate\+up's tiles must not set it"):
        tritonmoe.fused_experts(x, w13, w2, weights, ids, tiles=(atomic, atomic))
    inter = tritonmoe.gate_up_silu(x, w13, sched, plain)
    with pytest.raises(ValueError, match="atomic_combine adds weighted rows into token rows: it needs topk_weights"):
        tritonmoe.grouped_gemm(inter, w2, sched, atomic)
    with pytest.raises(ValueError, match=r"out must be a \(9, 40\)"):
        tritonmoe.grouped_gemm(inter, w2, sched, atomic, topk_weights=weights, out=x.new_zeros(8, H))
    with pytest.raises(ValueError, match="out is the atomic_combine result"):
        tritonmoe.grouped_gemm(inter, w2, sched, plain, topk_weights=weights, out=x.new_zeros(9, H))
    with pytest.raises(ValueError, match="TileConfig.atomic_combine must be a bool"):
        tritonmoe.TileConfig(atomic_combine=1)


def test_bad_schedule(device):
    with pytest.raises(ValueError, match="schedule must be one of"):
        tritonmoe.fused_experts(*make_inputs(4, 2, 8, device, torch.float32), schedule="dynamic")


@pytest.mark.parametrize("T", [20, 300])  # one-launch schedule / three launches
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_int64_ids_and_other_weight_dtypes(T, weight_dtype, device, poison):
    # read as given (transformers' routers hand over int64 ids), no cast launches
    x, w13, w2, weights, ids = make_inputs(T, 2, 8, device, torch.float32)
    check(x, w13, w2, weights.to(weight_dtype), ids.long())


def test_non_contiguous_inputs(device, poison):
    x, w13, w2, weights, ids = make_inputs(33, 2, 8, device, torch.float16)
    x_nc = torch.cat([x, x], 1)[:, ::2]                          # strided columns
    w13_nc = w13.transpose(1, 2).contiguous().transpose(1, 2)    # column-major per expert
    w2_nc = w2.transpose(0, 1).contiguous().transpose(0, 1)      # experts not outermost
    assert not (x_nc.is_contiguous() or w13_nc.is_contiguous() or w2_nc.is_contiguous())
    check(x_nc, w13_nc, w2_nc, weights.T.contiguous().T, ids.T.contiguous().T)


def test_empty_batch(device):
    x, w13, w2, weights, ids = make_inputs(0, 2, 8, device, torch.float32)
    out = tritonmoe.fused_experts(x, w13, w2, weights, ids)
    assert out.shape == (0, H) and out.device == x.device


def test_deterministic(device):
    args = make_inputs(64, 8, 64, device, torch.float16)
    assert torch.equal(tritonmoe.fused_experts(*args), tritonmoe.fused_experts(*args))


def _bad(device, **changes):
    x, w13, w2, weights, ids = make_inputs(4, 2, 8, device, torch.float32)
    args = dict(hidden_states=x, w13=w13, w2=w2, topk_weights=weights, topk_ids=ids)
    args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})
    return tritonmoe.fused_experts(args.pop("hidden_states"), args.pop("w13"), args.pop("w2"),
                                   args.pop("topk_weights"), args.pop("topk_ids"))


@pytest.mark.parametrize("changes, error, match", [
    (dict(hidden_states=lambda a: a["hidden_states"][0]), ValueError, "hidden_states"),
    (dict(hidden_states=lambda a: a["hidden_states"].long()), TypeError, "hidden_states"),
    (dict(hidden_states=lambda a: a["hidden_states"][:, :-1]), ValueError, "H="),
    (dict(w13=lambda a: a["w13"][:, :-1]), ValueError, "2\\*F"),
    (dict(w13=lambda a: a["w13"].half()), TypeError, "w13"),
    (dict(w2=lambda a: a["w2"][:, :, :-1]), ValueError, "w2"),
    (dict(w2=lambda a: a["w2"][:-1]), ValueError, "w2"),
    (dict(topk_ids=lambda a: a["topk_ids"][:-1]), ValueError, "topk_ids"),
    (dict(topk_ids=lambda a: a["topk_ids"].float()), TypeError, "topk_ids"),
    (dict(topk_weights=lambda a: a["topk_weights"][:, :1]), ValueError, "topk_weights"),
    (dict(topk_ids=lambda a: a["topk_ids"][:, :0], topk_weights=lambda a: a["topk_weights"][:, :0]),
     ValueError, "top_k"),
    (dict(topk_ids=lambda a: torch.zeros(4, 9, dtype=torch.int32, device=a["topk_ids"].device),
          topk_weights=lambda a: torch.ones(4, 9, device=a["topk_ids"].device)), ValueError, "top_k"),
])
def test_bad_input(changes, error, match, device):
    with pytest.raises(error, match=match):
        _bad(device, **changes)


# a slot schedule (the GEMMs check the ids) / one schedule chunk (one launch) / several (three launches)
@pytest.mark.parametrize("T", [1, 4, 700])
@pytest.mark.parametrize("bad_id", [8, -1, 2**32 + 1])  # the last: int64, 1 if narrowed before the check
def test_out_of_range_ids(bad_id, T, device):
    if device.type == "cpu":
        with pytest.raises(ValueError, match="topk_ids"):
            _bad(device, topk_ids=lambda a: a["topk_ids"].long() * 0 + bad_id)
        return
    # On the GPU the check is a device-side assertion (no host sync): it ends the CUDA
    # context, so it runs in a child process, which must fail with the message.
    code = (f"import torch, tritonmoe; T = {T}; x = torch.randn(T, 40, device='cuda'); "
            "w13 = torch.randn(8, 48, 40, device='cuda'); w2 = torch.randn(8, 40, 24, device='cuda'); "
            "ids = torch.randint(0, 8, (T, 2), dtype=torch.int64, device='cuda'); "
            f"ids[T - 1, 1] = {bad_id}; "
            "tritonmoe.fused_experts(x, w13, w2, torch.rand(T, 2, device='cuda'), ids); torch.cuda.synchronize()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "topk_ids has an expert id outside" in proc.stderr + proc.stdout


def test_device_mismatch(device):
    if device.type != "cuda":
        pytest.skip("needs a GPU and the CPU side by side")
    with pytest.raises(ValueError, match="w13"):
        _bad(device, w13=lambda a: a["w13"].cpu())


def test_bf16_refused_by_the_interpreter(device):
    # the interpreter's bf16 tl.dot returns garbage: an error, never wrong numbers (GPUs run bf16)
    if device.type != "cpu":
        pytest.skip("bf16 is supported on the GPU (tested by the dtype grids)")
    x, w13, w2, weights, ids = make_inputs(5, 2, 8, device, torch.bfloat16)
    with pytest.raises(TypeError, match="hidden_states is bfloat16"):
        tritonmoe.fused_experts(x, w13, w2, weights, ids)
    sched = tritonmoe.build_schedule(ids.int(), 8, 16)
    with pytest.raises(TypeError, match="bfloat16"):
        tritonmoe.gate_up_silu(x, w13, sched, tritonmoe.TileConfig(block_m=16))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_token_chunks(fused, device, poison):
    # 101 tokens in chunks of 32: four chunks, the last one partial; routing skewed to one expert
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.zeros(101, dtype=torch.int64), torch.randint(1, 8, (101,), generator=g)], 1)
    for dtype in dtypes_for(device):
        check(*make_inputs(101, 2, 8, device, dtype, ids=ids.to(torch.int32)), fused=fused, chunk_tokens=32)


@pytest.mark.parametrize("bad", [0, -4, 2.0, True])
def test_bad_chunk_tokens(bad, device):
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        tritonmoe.fused_experts(*make_inputs(4, 2, 8, device, torch.float32), chunk_tokens=bad)
