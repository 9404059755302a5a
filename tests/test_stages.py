"""Each stage on its own against its reference: permute, the GEMMs, the activation, combine."""
import pytest
import torch

import tritonmoe
from tritonmoe import TileConfig, reference
from conftest import assert_close, dtypes_for, random_topk_ids

# H, F not multiples of any block size; tiles small enough for several N- and K-blocks.
T, K_TOP, E, H, F = 37, 2, 8, 72, 40


def _setup(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype).to(device)
    w13 = (torch.randn(E, 2 * F, H, generator=g) / H ** 0.5).to(dtype).to(device)
    w2 = (torch.randn(E, H, F, generator=g) / F ** 0.5).to(dtype).to(device)
    ids = random_topk_ids(T, K_TOP, E, device, g)
    weights = torch.rand(T, K_TOP, generator=g).to(device)
    tiles = TileConfig(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2)
    return x, w13, w2, ids, weights, tiles, tritonmoe.build_schedule(ids, E, tiles.block_m)


def _ref_schedule(ids):
    return reference.build_schedule(ids.cpu(), E)


@pytest.fixture(params=["float32", "float16", "bfloat16"])
def dtype(request, device):
    dt = getattr(torch, request.param)
    if dt not in dtypes_for(device):
        pytest.skip("bf16 tl.dot is wrong under the Triton interpreter; bf16 runs on the GPU")
    return dt


def test_permute(device, dtype, poison):
    x, _, _, ids, _, _, s = _setup(device, dtype)
    _, _, sorted_slots, _ = _ref_schedule(ids)
    assert torch.equal(tritonmoe.permute(x, s).cpu(), reference.permute(x.cpu(), sorted_slots, K_TOP))


def test_gate_up_silu(device, dtype, poison):
    x, w13, _, ids, _, tiles, s = _setup(device, dtype)
    _, offsets, sorted_slots, _ = _ref_schedule(ids)
    ref = reference.gate_up_silu(reference.permute(x.cpu(), sorted_slots, K_TOP), w13.cpu(), offsets)
    assert_close(tritonmoe.gate_up_silu(x, w13, s, tiles), ref, dtype, "gate_up_silu")


def test_unfused_gate_up_and_activation(device, dtype, poison):
    x, w13, _, ids, _, tiles, s = _setup(device, dtype)
    _, offsets, sorted_slots, _ = _ref_schedule(ids)
    x_sorted = tritonmoe.permute(x, s)
    gate = tritonmoe.grouped_gemm(x_sorted, w13, s, tiles, n_offset=0, n=F)
    up = tritonmoe.grouped_gemm(x, w13, s, tiles, n_offset=F, n=F, gather_a=True)  # gather path too
    xs = x_sorted.cpu()
    ref_gate = torch.cat([xs[offsets[e]:offsets[e + 1]].double() @ w13[e, :F].cpu().double().T for e in range(E)])
    ref_up = torch.cat([xs[offsets[e]:offsets[e + 1]].double() @ w13[e, F:].cpu().double().T for e in range(E)])
    assert_close(gate, ref_gate, dtype, "gate")
    assert_close(up, ref_up, dtype, "up")
    act = tritonmoe.silu_mul(gate, up)
    assert_close(act, reference.silu_mul(gate.cpu().double(), up.cpu().double()), dtype, "silu_mul")


def test_down_weighted_scatter_and_combine(device, dtype, poison):
    x, w13, w2, ids, weights, tiles, s = _setup(device, dtype)
    _, offsets, sorted_slots, positions = _ref_schedule(ids)
    inter = torch.randn(T * K_TOP, F).to(dtype).to(device)
    # unweighted, rows stay sorted
    assert_close(tritonmoe.grouped_gemm(inter, w2, s, tiles), reference.down(inter.cpu(), w2.cpu(), offsets),
                 dtype, "down")
    # weighted: each row scaled by its routing weight and written at its slot
    slot_rows = tritonmoe.grouped_gemm(inter, w2, s, tiles, topk_weights=weights.contiguous())
    ref_sorted = reference.down(inter.cpu(), w2.cpu(), offsets)
    ref_slots = ref_sorted[positions] * weights.cpu().double().reshape(-1, 1)
    assert_close(slot_rows, ref_slots, dtype, "down weighted")
    out = tritonmoe.combine(slot_rows, K_TOP)
    assert_close(out, ref_slots.view(T, K_TOP, H).sum(1), dtype, "combine")
    assert_close(out, reference.combine(ref_sorted, weights.cpu(), positions, K_TOP), dtype, "combine vs ref")


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("f, block_k", [(40, 32), (64, 16)])  # ragged last slice / whole BLOCK_Ks (EVEN_K)
def test_down_split_k(device, dtype, poison, split_k, f, block_k):
    x, _, _, ids, weights, _, s = _setup(device, dtype)
    g = torch.Generator().manual_seed(1)
    inter = torch.randn(T * K_TOP, f, generator=g).to(dtype).to(device)
    w2 = (torch.randn(E, H, f, generator=g) / f ** 0.5).to(dtype).to(device)
    tiles = TileConfig(block_m=16, block_n=32, block_k=block_k, group_m=2, num_warps=4, num_stages=2,
                       split_k=split_k)
    partials = tritonmoe.grouped_gemm(inter, w2, s, tiles, topk_weights=weights.contiguous())
    assert partials.shape == (T * K_TOP * split_k, H) and partials.dtype == torch.float32
    _, offsets, _, positions = _ref_schedule(ids)
    ref = reference.combine(reference.down(inter.cpu(), w2.cpu(), offsets), weights.cpu(), positions, K_TOP)
    out = tritonmoe.combine(partials, K_TOP * split_k, dtype=dtype)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, f"down split_k={split_k} + combine")


def test_split_k_errors(device):
    x, w13, w2, ids, weights, tiles, s = _setup(device, torch.float32)
    split = TileConfig(block_m=16, block_n=32, block_k=32, split_k=2)
    with pytest.raises(ValueError, match="split_k"):
        tritonmoe.gate_up_silu(x, w13, s, split)
    with pytest.raises(ValueError, match="split_k"):
        tritonmoe.grouped_gemm(torch.randn(T * K_TOP, F, device=device), w2, s, split)
    with pytest.raises(ValueError, match="top_k"):
        tritonmoe.combine(torch.randn(7, H, device=device), 2)
    with pytest.raises(ValueError, match="split_k"):
        TileConfig(split_k=0)
