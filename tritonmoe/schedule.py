"""Stage 2 -- the schedule: which rows each GEMM program multiplies by which expert.

Built on the GPU from ``topk_ids`` with no host synchronisation (so a whole forward
can be captured in a CUDA graph), deterministic and stable. Up to ``ONE_LAUNCH_SLOTS`` slots
it is one launch, ``_schedule_one_chunk_kernel``; above, three, with one program per chunk
of ``CHUNK_SLOTS`` slots where they work per slot:

1. ``_histogram_kernel``: per chunk of BLOCK_S slots, how many go to each expert.
2. ``_scan_kernel`` (one program): expert counts and offsets, per chunk and expert the slots
   of that expert in the chunks before it, and the M-block map: block b -> (expert, first sorted
   row, its rank among the expert's blocks and their number; the GEMMs group an expert's blocks
   by these), experts in id order or, with ``busy_first``, those with several blocks first.
3. ``_scatter_kernel``: per chunk, give each slot its row in the expert-sorted order
   (its expert's first row, plus that expert's slots in earlier chunks, plus its rank among
   the chunk's earlier slots of that expert), and write the inverse map.

A *slot* is one (token, choice) pair, ``slot = t * k + j``. Slots are sorted by expert,
and by slot within an expert. Activations are never padded: an expert's last M-block
simply masks rows past the expert's end. The grid of the GEMMs is a host-side upper
bound on the number of M-blocks; programs past ``num_blocks`` (read on the device) exit.
The GEMMs (``tritonmoe.gemm``) come next.

``slot_schedule`` is the schedule with no launch at all: every slot its own M-block of one row, in
slot order, its expert read from ``topk_ids`` by the GEMMs themselves. A token's k choices name k
distinct experts in every router this package implements, so at T = 1 these are the blocks
``build_schedule`` makes, less its kernel and the gap after it. At larger T an expert chosen by
several tokens gets one block per slot, each reading its weight tiles (together, so mostly from L2).
The forward runs it up to ``functional.SLOT_SCHEDULE_MAX_TOKENS`` tokens (experiments/PERF_LOG.md v16).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import await_previous, launch
from ._utils import cdiv, next_pow2

__all__ = ["Schedule", "build_schedule", "slot_schedule", "max_blocks", "SLOT_BLOCK_M"]

# Up to ONE_LAUNCH_SLOTS slots one program builds the whole schedule (small T is bound by host
# time, and each launch costs it). Above, CHUNK_SLOTS per program of the histogram and the
# scatter: smaller chunks mean more programs working at once.
ONE_LAUNCH_SLOTS = 512
CHUNK_SLOTS = 256
SLOT_BLOCK_M = 16  # tile height of slot_schedule's one-row blocks: the smallest tl.dot takes


@dataclass
class Schedule:
    """The expert-sorted order of the T*k slots and the M-block map of the grouped GEMMs."""

    num_tokens: int               # T
    top_k: int                    # k
    num_experts: int              # E
    block_m: int                  # rows per GEMM M-block (every expert uses the same)
    max_blocks: int               # host-side upper bound on M-blocks: the GEMMs' grid size in M
    # The tensors below are None in a slot schedule (``slot_blocks``): its M-block b is slot b, of
    # expert topk_ids.flatten()[b], and its rows are in slot order.
    expert_counts: torch.Tensor | None   # (E,) int32: slots routed to each expert
    expert_offsets: torch.Tensor | None  # (E+2,) int32: first sorted row of each expert; [E] = valid slots,
                                         # slots with out-of-range ids sort after them, [E+1] = T*k
    sorted_slots: torch.Tensor | None    # (T*k,) int32: the slot at each sorted row
    slot_positions: torch.Tensor | None  # (T*k,) int32: the sorted row of each slot (inverse of sorted_slots)
    block_expert: torch.Tensor           # (max_blocks,) int32: expert of each M-block; -1 past num_blocks
                                         # (slot schedule: topk_ids as given, flattened, int32 or int64)
    block_row_start: torch.Tensor | None  # (max_blocks,) int32: first sorted row of each M-block
    block_rank: torch.Tensor | None      # (max_blocks,) int32: index of each M-block among its expert's;
                                         # 0 past num_blocks
    block_siblings: torch.Tensor | None  # (max_blocks,) int32: M-blocks of each block's expert; 1 past num_blocks
    num_blocks: torch.Tensor | None      # (1,) int32: M-blocks in use
    num_busy_blocks: torch.Tensor | None  # (1,) int32: M-blocks of experts with more than one (with busy_first,
                                         # blocks [0, num_busy_blocks) are theirs)
    num_invalid: torch.Tensor | None     # (1,) int32: slots whose expert id was out of [0, E)
    slot_blocks: bool = False            # a slot schedule (``slot_schedule``)
    absorb_m: int = 0                    # an expert's last whole M-block also takes its remaining rows
                                         # where they are at most this many (``build_schedule``)
    busy_first: bool = False             # M-blocks of experts with more than one come first (``build_schedule``)


def max_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound on sum_e cdiv(count_e, block_m) when the counts add up to num_slots."""
    if num_slots == 0:
        return 0
    return cdiv(num_slots, block_m) + min(num_experts, num_slots) - 1


@triton.jit
def _bin_of(ids_ptr, offs_s, S, E):
    """Histogram bin of each slot: its expert, E for an out-of-range id, E+1 past the end."""
    ids = tl.load(ids_ptr + offs_s, mask=offs_s < S, other=0)                # int32 or int64
    bins = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)             # range-checked before narrowing
    return tl.where(offs_s < S, bins, E + 1)


@triton.jit
def _chunk_histogram(ids_ptr, chunk_start, S, E, BLOCK_S: tl.constexpr, NBINS: tl.constexpr):
    """Slots per bin in one chunk. An out-of-range expert id stops the program on the GPU
    (device_assert, compiled in by the callers' debug=True) at no host sync."""
    offs_s = chunk_start + tl.arange(0, BLOCK_S)                              # [BS]
    bins = _bin_of(ids_ptr, offs_s, S, E)
    tl.device_assert(bins != E, "tritonmoe: topk_ids has an expert id outside [0, num_experts)")
    return tl.histogram(bins, NBINS)                                         # [NBINS]


@triton.jit
def _block_map(totals, starts, block_expert_ptr, block_row_ptr, block_rank_ptr, block_siblings_ptr, num_blocks_ptr,
               num_busy_ptr, E, max_blocks, BLOCK_M: tl.constexpr, ABSORB_M: tl.constexpr, BUSY_FIRST: tl.constexpr,
               NBINS: tl.constexpr, BLOCK_R: tl.constexpr):
    """M-block b -> (expert, first sorted row, rank among the expert's blocks, the expert's block
    count), from the slots per bin and their first rows. Only real experts get blocks; blocks past
    the used ones get expert -1 (rank 0 of 1). ABSORB_M > 0: an expert with a whole block and at most
    ABSORB_M rows after its last one gets no block for them: its last block takes them (its rows run
    to the expert's end). An expert's blocks are consecutive, experts in id order; BUSY_FIRST: experts with
    more than one block first, then those with one (each part in id order). Written expert-major, BLOCK_R
    ranks of every expert at a time: as many steps as the busiest expert has blocks / BLOCK_R (one, mostly),
    not one per block."""
    offs_bin = tl.arange(0, NBINS)
    nblk = (totals + BLOCK_M - 1) // BLOCK_M
    if ABSORB_M > 0:
        rest = totals % BLOCK_M
        nblk -= ((totals >= BLOCK_M) & (rest > 0) & (rest <= ABSORB_M)).to(tl.int32)
    nblk = tl.where(offs_bin < E, nblk, 0)                                   # [NBINS]
    used = tl.sum(nblk, axis=0)
    busy = tl.where(nblk > 1, nblk, 0)  # blocks of experts with more than one
    if BUSY_FIRST:
        blk_start = tl.where(nblk > 1, tl.cumsum(busy, axis=0) - busy,
                             tl.sum(busy, axis=0) + tl.cumsum(nblk - busy, axis=0) - (nblk - busy))
    else:
        blk_start = tl.cumsum(nblk, axis=0) - nblk
    first = offs_bin == 0
    tl.store(num_blocks_ptr + offs_bin * 0, tl.full((NBINS,), 0, tl.int32) + used, mask=first)
    tl.store(num_busy_ptr + offs_bin * 0, tl.full((NBINS,), 0, tl.int32) + tl.sum(busy, axis=0), mask=first)
    TILE: tl.constexpr = (BLOCK_R, NBINS)
    experts = tl.broadcast_to(offs_bin[None, :], TILE)
    for r0 in range(0, tl.max(nblk, axis=0), BLOCK_R):
        rank = tl.broadcast_to(r0 + tl.arange(0, BLOCK_R)[:, None], TILE)   # [BR, NBINS]: rank r of expert e
        live = rank < nblk[None, :]
        b = blk_start[None, :] + rank
        tl.store(block_expert_ptr + b, experts, mask=live)
        tl.store(block_row_ptr + b, starts[None, :] + rank * BLOCK_M, mask=live)
        tl.store(block_rank_ptr + b, rank, mask=live)
        tl.store(block_siblings_ptr + b, tl.broadcast_to(nblk[None, :], TILE), mask=live)
    # the grid's blocks past the used ones: no expert
    STEP: tl.constexpr = BLOCK_R * NBINS
    for b0 in range(used, max_blocks, STEP):
        b = b0 + tl.arange(0, STEP)
        unused = b < max_blocks
        tl.store(block_expert_ptr + b, tl.full((STEP,), -1, tl.int32), mask=unused)
        tl.store(block_row_ptr + b, tl.zeros((STEP,), tl.int32), mask=unused)
        tl.store(block_rank_ptr + b, tl.zeros((STEP,), tl.int32), mask=unused)
        tl.store(block_siblings_ptr + b, tl.full((STEP,), 1, tl.int32), mask=unused)


@triton.jit
def _store_totals(totals, starts, counts_ptr, offsets_ptr, num_invalid_ptr, E, NBINS: tl.constexpr):
    offs_bin = tl.arange(0, NBINS)
    tl.store(counts_ptr + offs_bin, totals, mask=offs_bin < E)
    tl.store(offsets_ptr + offs_bin, starts, mask=offs_bin <= E + 1)
    tl.store(num_invalid_ptr + offs_bin * 0, totals, mask=offs_bin == E)


@triton.jit
def _scatter_chunk(ids_ptr, next_row, sorted_slots_ptr, slot_pos_ptr, chunk_start, S, E,
                   BLOCK_S: tl.constexpr, SUB_S: tl.constexpr, NBINS: tl.constexpr):
    """Give each slot of the chunk its sorted row: ``next_row[bin]`` (the chunk's first row per
    bin) plus its rank among the chunk's earlier slots of that bin (stable)."""
    local = tl.arange(0, SUB_S)
    offs_bin = tl.arange(0, NBINS)
    for s0 in range(0, tl.minimum(BLOCK_S, S - chunk_start), SUB_S):
        offs_s = chunk_start + s0 + local                                    # [SUB]
        bins = _bin_of(ids_ptr, offs_s, S, E)
        if NBINS < SUB_S:
            # few bins: running count per bin, [SUB, NBINS] work instead of [SUB, SUB]
            one_hot = (bins[:, None] == offs_bin[None, :]).to(tl.int32)
            rank = tl.sum(tl.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1
        else:
            before = local[None, :] < local[:, None]                         # [SUB, SUB]: j precedes i
            rank = tl.sum(((bins[None, :] == bins[:, None]) & before).to(tl.int32), axis=1)
        row = tl.gather(next_row, bins, 0) + rank
        valid = bins <= E
        tl.store(sorted_slots_ptr + row, offs_s.to(tl.int32), mask=valid)
        tl.store(slot_pos_ptr + offs_s, row, mask=valid)
        next_row += tl.histogram(bins, NBINS)


# debug=True keeps the device_assert of _chunk_histogram (Triton drops asserts otherwise).
@triton.jit(debug=True)
def _histogram_kernel(ids_ptr, hist_ptr, S, E, BLOCK_S: tl.constexpr, NBINS: tl.constexpr, USE_GDC: tl.constexpr):
    await_previous(USE_GDC)
    pid = tl.program_id(0)
    hist = _chunk_histogram(ids_ptr, pid.to(tl.int64) * BLOCK_S, S, E, BLOCK_S, NBINS)
    tl.store(hist_ptr + pid * NBINS + tl.arange(0, NBINS), hist)


@triton.jit
def _scan_kernel(
    hist_ptr, base_ptr, counts_ptr, offsets_ptr, block_expert_ptr, block_row_ptr, block_rank_ptr,
    block_siblings_ptr, num_blocks_ptr, num_busy_ptr, num_invalid_ptr, num_chunks, E, max_blocks,
    BLOCK_M: tl.constexpr, ABSORB_M: tl.constexpr, BUSY_FIRST: tl.constexpr, NBINS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, USE_GDC: tl.constexpr,
):
    await_previous(USE_GDC)
    # One pass over the chunks' histograms, BLOCK_C chunks at a time (one load each, not one per
    # chunk: one step per chunk took 240 us at DeepSeek-V3's T = 8192, PERF_LOG v20): per (chunk,
    # bin) the slots of that bin in the chunks before it (the scatter adds the bin's first row).
    offs_bin = tl.arange(0, NBINS)
    offs_c = tl.arange(0, BLOCK_C)
    totals = tl.zeros((NBINS,), tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        at = (c0 + offs_c[:, None]) * NBINS + offs_bin[None, :]              # [BC, NBINS]
        in_range = (c0 + offs_c[:, None] < num_chunks) & (offs_bin[None, :] >= 0)
        hist = tl.load(hist_ptr + at, mask=in_range, other=0)
        tl.store(base_ptr + at, totals[None, :] + tl.cumsum(hist, axis=0) - hist, mask=in_range)
        totals += tl.sum(hist, axis=0)
    starts = tl.cumsum(totals, axis=0) - totals                              # exclusive: first row per bin
    _store_totals(totals, starts, counts_ptr, offsets_ptr, num_invalid_ptr, E, NBINS)
    _block_map(totals, starts, block_expert_ptr, block_row_ptr, block_rank_ptr, block_siblings_ptr, num_blocks_ptr,
               num_busy_ptr, E, max_blocks, BLOCK_M, ABSORB_M, BUSY_FIRST, NBINS, BLOCK_R)


@triton.jit
def _scatter_kernel(ids_ptr, base_ptr, offsets_ptr, sorted_slots_ptr, slot_pos_ptr, S, E,
                    BLOCK_S: tl.constexpr, SUB_S: tl.constexpr, NBINS: tl.constexpr, USE_GDC: tl.constexpr):
    await_previous(USE_GDC)
    pid = tl.program_id(0)
    offs_bin = tl.arange(0, NBINS)
    # [NBINS] next free row per bin: the bin's first row and its slots in the chunks before this one
    next_row = (tl.load(base_ptr + pid * NBINS + offs_bin)
                + tl.load(offsets_ptr + offs_bin, mask=offs_bin <= E + 1, other=0))
    _scatter_chunk(ids_ptr, next_row, sorted_slots_ptr, slot_pos_ptr, pid.to(tl.int64) * BLOCK_S, S, E,
                   BLOCK_S, SUB_S, NBINS)


# All of the above in one program when the slots are few (small T: launch-bound).
@triton.jit(debug=True)
def _schedule_one_chunk_kernel(
    ids_ptr, counts_ptr, offsets_ptr, block_expert_ptr, block_row_ptr, block_rank_ptr, block_siblings_ptr,
    num_blocks_ptr, num_busy_ptr, num_invalid_ptr, sorted_slots_ptr, slot_pos_ptr, S, E, max_blocks,
    BLOCK_S: tl.constexpr, SUB_S: tl.constexpr, BLOCK_M: tl.constexpr, ABSORB_M: tl.constexpr,
    BUSY_FIRST: tl.constexpr, NBINS: tl.constexpr, BLOCK_R: tl.constexpr, USE_GDC: tl.constexpr,
):
    await_previous(USE_GDC)
    totals = _chunk_histogram(ids_ptr, 0, S, E, BLOCK_S, NBINS)
    starts = tl.cumsum(totals, axis=0) - totals
    _store_totals(totals, starts, counts_ptr, offsets_ptr, num_invalid_ptr, E, NBINS)
    _block_map(totals, starts, block_expert_ptr, block_row_ptr, block_rank_ptr, block_siblings_ptr, num_blocks_ptr,
               num_busy_ptr, E, max_blocks, BLOCK_M, ABSORB_M, BUSY_FIRST, NBINS, BLOCK_R)
    _scatter_chunk(ids_ptr, starts, sorted_slots_ptr, slot_pos_ptr, 0, S, E, BLOCK_S, SUB_S, NBINS)


def _sub_slots(block_s: int, nbins: int) -> int:
    # slots ranked at once: a [SUB, SUB] pairwise comparison, or [SUB, NBINS] counts when bins are few
    return min(block_s, 64 if nbins >= 64 else max(64, 4096 // nbins))


@functools.lru_cache(maxsize=4096)  # host arithmetic of a call: small T is bound by host time
def _plan(S: int, num_experts: int, block_m: int):
    nbins = next_pow2(num_experts + 2)
    one_launch = S <= ONE_LAUNCH_SLOTS
    block_s = max(16, next_pow2(S)) if one_launch else CHUNK_SLOTS
    num_chunks = 1 if one_launch else cdiv(S, block_s)
    nmax = max_blocks(S, num_experts, block_m)
    # One allocation for every buffer; parts padded to 4 int32 so each view stays 16-byte aligned.
    sizes = [num_experts, num_experts + 2, S, S, nmax, nmax, nmax, nmax, 1, 1, 1]
    sizes += [] if one_launch else [num_chunks * nbins] * 2
    bounds, end = [], 0
    for n in sizes:
        bounds.append((end, end + n))
        end += cdiv(n, 4) * 4
    # [ranks, bins] of the block map and [chunks, bins] of the scan per step: about 8192 elements
    block_r = max(1, 8192 // nbins)
    block_c = min(next_pow2(num_chunks), max(1, 8192 // nbins))
    return one_launch, nbins, block_s, num_chunks, nmax, block_r, block_c, _sub_slots(block_s, nbins), end, bounds


def build_schedule(topk_ids: torch.Tensor, num_experts: int, block_m: int, absorb_m: int = 0,
                   busy_first: bool = False) -> Schedule:
    """Build the schedule for int32 or int64 (T, k) ``topk_ids`` on their device, without host sync.

    Out-of-range ids are counted in ``num_invalid`` and given no GEMM block, so no kernel
    reads or writes out of bounds; ``tritonmoe.fused_experts`` turns them into an error.

    ``absorb_m`` (0: off; else a power of two below ``block_m``): an expert with at least one whole
    M-block and 1 to ``absorb_m`` rows after its last one gets no block for those rows; its last whole
    block takes them, so they read the expert's weight tiles with it instead of in a block of their own
    (the GEMMs' ``TileConfig.absorb_m``).

    ``busy_first``: the M-blocks of experts with more than one come before those of experts with one
    (else all in expert order), for GEMMs that walk them from both ends (``TileConfig.interleave``).
    """
    if absorb_m and not (absorb_m & (absorb_m - 1) == 0 and 16 <= absorb_m < block_m):
        raise ValueError(f"absorb_m must be 0 or a power of two in [16, block_m={block_m}), got {absorb_m}")
    T, k = topk_ids.shape
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    S = T * k
    one_launch, nbins, block_s, num_chunks, nmax, block_r, block_c, sub_s, total, bounds = _plan(S, num_experts, block_m)
    buf = torch.empty(total, dtype=torch.int32, device=ids.device)
    parts = [buf[a:b] for a, b in bounds]
    sched = Schedule(
        num_tokens=T, top_k=k, num_experts=num_experts, block_m=block_m, max_blocks=nmax,
        expert_counts=parts[0], expert_offsets=parts[1], sorted_slots=parts[2], slot_positions=parts[3],
        block_expert=parts[4], block_row_start=parts[5], block_rank=parts[6], block_siblings=parts[7],
        num_blocks=parts[8], num_busy_blocks=parts[9], num_invalid=parts[10], absorb_m=absorb_m,
        busy_first=bool(busy_first),
    )
    if S == 0:
        sched.expert_counts.zero_(); sched.expert_offsets.zero_(); sched.num_blocks.zero_()
        sched.num_busy_blocks.zero_()
        sched.num_invalid.zero_()
        return sched
    if one_launch:
        launch(_schedule_one_chunk_kernel, (1,), (
            ids, sched.expert_counts, sched.expert_offsets, sched.block_expert, sched.block_row_start,
            sched.block_rank, sched.block_siblings, sched.num_blocks, sched.num_busy_blocks, sched.num_invalid,
            sched.sorted_slots, sched.slot_positions, S, num_experts, nmax, block_s, sub_s, block_m, absorb_m,
            bool(busy_first), nbins, block_r))
        return sched
    hist, base = parts[11].view(num_chunks, nbins), parts[12].view(num_chunks, nbins)
    launch(_histogram_kernel, (num_chunks,), (ids, hist, S, num_experts, block_s, nbins))
    launch(_scan_kernel, (1,), (hist, base, sched.expert_counts, sched.expert_offsets, sched.block_expert,
                                sched.block_row_start, sched.block_rank, sched.block_siblings, sched.num_blocks,
                                sched.num_busy_blocks, sched.num_invalid, num_chunks, num_experts, nmax, block_m,
                                absorb_m, bool(busy_first), nbins, block_r, block_c), num_warps=8)
    launch(_scatter_kernel, (num_chunks,), (ids, base, sched.expert_offsets, sched.sorted_slots, sched.slot_positions,
                                            S, num_experts, block_s, sub_s, nbins))
    return sched


def slot_schedule(topk_ids: torch.Tensor, num_experts: int) -> Schedule:
    """Every slot its own M-block of one row (``SLOT_BLOCK_M`` tall), rows in slot order: no launch.

    The GEMMs read each block's expert from ``topk_ids`` (int32 or int64 (T, k)); on the GPU an
    out-of-range id trips their device-side assertion, as in ``build_schedule``'s kernel.
    """
    T, k = topk_ids.shape
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    return Schedule(num_tokens=T, top_k=k, num_experts=num_experts, block_m=SLOT_BLOCK_M, max_blocks=T * k,
                    expert_counts=None, expert_offsets=None, sorted_slots=None, slot_positions=None,
                    block_expert=ids.view(-1), block_row_start=None, block_rank=None, block_siblings=None,
                    num_blocks=None, num_busy_blocks=None, num_invalid=None, slot_blocks=True)
