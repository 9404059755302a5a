"""Router matmul (``tritonmoe.router_logits``) vs the float64 product, kernel and PyTorch paths."""
import pytest
import torch

import tritonmoe
from tritonmoe.router import GEMV_TOKENS, _router_mma
from conftest import rel_err


def _inputs(T, E, H, dtype, device, seed=0, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype).to(device)
    w = (torch.randn(E, H, generator=g) * H ** -0.5).to(weight_dtype or dtype).to(device)
    return x, w


# bf16 too on the CPU: the kernel multiplies elementwise in float32 (no tl.dot on bf16 tiles)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("float32", [False, True], ids=["model-dtype", "float32"])
@pytest.mark.parametrize("T", [1, 2, 5, GEMV_TOKENS, GEMV_TOKENS + 1])
@pytest.mark.parametrize("E,H", [(8, 96), (60, 200), (256, 64)])
def test_router_logits(E, H, T, float32, dtype, device, poison):
    x, w = _inputs(T, E, H, dtype, device, seed=T * E)
    out = tritonmoe.router_logits(x, w, float32=float32)
    expect_dtype = torch.float32 if float32 else dtype
    assert out.dtype == expect_dtype and out.shape == (T, E)
    ref = x.double() @ w.double().T
    # float32 sums: far under 1e-5; rounded to a 16-bit dtype: its half ulp
    tol = 1e-5 if expect_dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 1e-2)
    assert rel_err(out, ref) < tol
    # the same function as the models' PyTorch expression
    torch_out = x.to(expect_dtype) @ w.to(expect_dtype).T
    assert rel_err(out, torch_out.double()) < tol


@pytest.mark.parametrize("T", [3, GEMV_TOKENS + 3], ids=["gemv", "matmul"])
def test_router_logits_strided_and_mixed_dtypes(T, device, poison):
    # a transposed view of the tokens and a float32 weight beside bfloat16 tokens (read as stored)
    x, w = _inputs(T, 40, 72, torch.bfloat16, device, weight_dtype=torch.float32)
    xt = x.T.contiguous().T
    out = tritonmoe.router_logits(xt, w, float32=True)
    assert rel_err(out, x.double() @ w.double().T) < 1e-5
    # the same dtype on both sides: above GEMV_TOKENS, the float32 logits on the tensor cores; strided weight too
    w16 = w.to(torch.bfloat16)
    out = tritonmoe.router_logits(xt, w16.T.contiguous().T, float32=True)
    assert rel_err(out, x.double() @ w16.double().T) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,E,H", [(130, 60, 200), (300, 256, 96)])
def test_router_logits_float32_matmul_tiles(T, E, H, dtype, device, poison):
    # the float32 logits of 16-bit inputs above GEMV_TOKENS: T across 64/128-token tiles, E not a power of
    # two or more than one expert tile, H not a multiple of the 64-wide steps; every logit compared
    x, w = _inputs(T, E, H, dtype, device, seed=T + E)
    out = tritonmoe.router_logits(x, w, float32=True)
    ref = x.double() @ w.double().T
    assert out.dtype == torch.float32 and out.shape == (T, E)
    assert rel_err(out, ref) < 1e-5
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    for tile in ((16, 16), (32, 64), (128, 128)):  # the tiles _mma_tile picks on a GPU, small to large
        out = _router_mma(x, w, tile)
        assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), tile


def test_router_logits_bad_input(device):
    x, w = _inputs(2, 8, 32, torch.float32, device)
    with pytest.raises(ValueError, match="router_weight has hidden size 31"):
        tritonmoe.router_logits(x, w[:, :31])
    with pytest.raises(ValueError, match="router_weight must have 2 dimensions"):
        tritonmoe.router_logits(x, w[0])
    with pytest.raises(TypeError, match="hidden_states has dtype int32"):
        tritonmoe.router_logits(x.to(torch.int32), w)
