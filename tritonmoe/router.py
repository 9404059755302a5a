"""Stage 0 -- the router matmul: (T, H) tokens x (E, H) router weight -> (T, E) logits.

At decode sizes it is a matrix-vector product whose cost is one read of the router weight
(DeepSeek-V3: 256 x 7168 bf16, 3.7 MB). PyTorch spends three kernels on the float32 form that
DeepSeek-V3 uses (upcast the tokens, upcast the weight -- 7.3 MB written and read again -- then
the matmul), 15 us on an H100, and a matmul plus a split-K reduction on the others (5-6 us;
``experiments/probe_decode.py``). ``router_logits`` reads the weight once, in its own dtype, and
multiplies in float32 in one launch, many programs wide. Past ``GEMV_TOKENS`` tokens it is a
real matmul. In the tokens' dtype PyTorch's is fast (one cuBLAS GEMM). The float32 form is not: at
DeepSeek-V3's T = 8192 PyTorch spent 222 us upcasting the tokens and 844 us in a float32 GEMM on the
H100 (``probe_decode --points``, PERF_LOG v20), 8 % of the layer. With 16-bit tokens and weight,
``_router_mma_kernel`` multiplies the tiles as stored on the tensor cores with float32 accumulation:
products of 16-bit numbers are exact in float32, so this too is the float32 matmul of the upcast
inputs up to the order of the sums.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import await_previous, launch
from ._utils import SUPPORTED_DTYPES, cdiv, check_tensor, interpreting, next_pow2, num_sms

__all__ = ["router_logits", "GEMV_TOKENS"]

GEMV_TOKENS = 16     # up to this many tokens, _router_kernel; above, a matmul (PyTorch, or _router_mma_kernel)
_PROGRAMS = 256      # at least this many programs where E allows: the weight read needs every SM busy
_ELEMENTS = 8192     # per program and step, tokens x experts x hidden (64 float32 registers a thread)
_MMA_DTYPES = (torch.float16, torch.bfloat16)  # float32 logits above GEMV_TOKENS: _router_mma_kernel


@triton.jit
def _router_kernel(x_ptr, w_ptr, out_ptr, T, E, H, stride_xt, stride_xh, stride_we, stride_wh, stride_ot, stride_oe,
                   BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, USE_GDC: tl.constexpr):
    await_previous(USE_GDC)
    # Each program: all T tokens against BLOCK_E experts' rows, over H in BLOCK_H steps. Products of
    # 16-bit inputs are exact in float32, so this is the float32 matmul of the upcast inputs up to
    # the order of the sums.
    offs_t = tl.arange(0, BLOCK_T)                                                            # [BT]
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)                               # [BE]
    offs_h = tl.arange(0, BLOCK_H)                                                            # [BH]
    mask_t, mask_e = offs_t < T, offs_e < E
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        mask_h = h0 + offs_h < H
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + (h0 + offs_h)[None, :] * stride_xh,
                    mask=mask_t[:, None] & mask_h[None, :], other=0.0).to(tl.float32)       # [BT, BH]
        w = tl.load(w_ptr + offs_e[:, None].to(tl.int64) * stride_we + (h0 + offs_h)[None, :] * stride_wh,
                    mask=mask_e[:, None] & mask_h[None, :], other=0.0).to(tl.float32)       # [BE, BH]
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)                                 # [BT, BE]
    tl.store(out_ptr + offs_t[:, None] * stride_ot + offs_e[None, :] * stride_oe,
             acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_e[None, :])


@triton.jit
def _router_mma_kernel(x_ptr, w_ptr, out_ptr, T, E, H, stride_xt, stride_xh, stride_we, stride_wh, stride_ot,
                       stride_oe, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
                       UPCAST: tl.constexpr, USE_GDC: tl.constexpr):
    await_previous(USE_GDC)
    # One (BLOCK_T tokens) x (BLOCK_E experts) tile of float32 logits over H. UPCAST: multiply in float32
    # (IEEE) instead, for Triton's interpreter, whose tl.dot on bfloat16 tiles is wrong; the same numbers.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)                              # [BT]
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)                              # [BE]
    offs_h = tl.arange(0, BLOCK_H)                                                            # [BH]
    mask_t, mask_e = offs_t < T, offs_e < E
    x_ptrs = x_ptr + offs_t[:, None].to(tl.int64) * stride_xt + offs_h[None, :] * stride_xh
    w_ptrs = w_ptr + offs_e[None, :].to(tl.int64) * stride_we + offs_h[:, None] * stride_wh
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        mask_h = h0 + offs_h < H
        x = tl.load(x_ptrs, mask=mask_t[:, None] & mask_h[None, :], other=0.0)              # [BT, BH]
        w = tl.load(w_ptrs, mask=mask_h[:, None] & mask_e[None, :], other=0.0)              # [BH, BE]
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_H * stride_xh
        w_ptrs += BLOCK_H * stride_wh
    tl.store(out_ptr + offs_t[:, None] * stride_ot + offs_e[None, :] * stride_oe, acc,
             mask=mask_t[:, None] & mask_e[None, :])


def _mma_tile(T: int, E: int, sms: int) -> tuple[int, int]:
    """(tokens, experts) per program of ``_router_mma_kernel``: the largest tile, from 128 x 128, that leaves
    at least half as many programs as SMs, halving the longer side first (down to 16). Every K step is one
    dependent load, so a program takes about 30 us over DeepSeek-V3's H = 7168 however small its tile;
    fewer, larger tiles read the weight and the tokens fewer times. On the H100 this picked the fastest of
    nine tiles, or one within 5 % of it, at T = 32 ... 8192 (``probe_front``, PERF_LOG v20)."""
    block_t, block_e = 128, max(16, min(128, next_pow2(E)))
    while cdiv(T, block_t) * cdiv(E, block_e) < sms // 2 and max(block_t, block_e) > 16:
        if block_t >= block_e:
            block_t //= 2
        else:
            block_e //= 2
    return block_t, block_e


def _router_mma(hidden_states: torch.Tensor, router_weight: torch.Tensor, tile: tuple[int, int] | None = None):
    """float32 logits of 16-bit tokens and weight of one dtype: (T, H), (E, H) -> (T, E). ``tile``: (tokens,
    experts) per program instead of ``_mma_tile``'s (``experiments/probe_front.py`` compares them)."""
    (T, H), E = hidden_states.shape, router_weight.shape[0]
    out = torch.empty(T, E, dtype=torch.float32, device=hidden_states.device)
    block_t, block_e = tile or _mma_tile(T, E, num_sms(hidden_states.device))
    launch(_router_mma_kernel, (cdiv(T, block_t), cdiv(E, block_e)), (
        hidden_states, router_weight, out, T, E, H, hidden_states.stride(0), hidden_states.stride(1),
        router_weight.stride(0), router_weight.stride(1), out.stride(0), out.stride(1), block_t, block_e, 64,
        interpreting()), num_warps=8 if block_t * block_e >= 128 * 128 else 4, num_stages=4)
    return out


def router_logits(hidden_states: torch.Tensor, router_weight: torch.Tensor, *, float32: bool = False) -> torch.Tensor:
    """``hidden_states @ router_weight.T`` as the models compute it: (T, H), (E, H) -> (T, E).

    ``float32=True`` (DeepSeek-V3) is the matmul of both upcast to float32, returned in float32;
    otherwise the matmul in the tokens' dtype (float32 accumulation, rounded to that dtype), as
    Mixtral and Qwen2-MoE do. Any strides; the weight may have another floating dtype than the tokens
    (it is read as stored).
    """
    check_tensor("hidden_states", hidden_states, ndim=2, dtypes=SUPPORTED_DTYPES)
    check_tensor("router_weight", router_weight, ndim=2, dtypes=SUPPORTED_DTYPES, device=hidden_states.device)
    (T, H), E = hidden_states.shape, router_weight.shape[0]
    if router_weight.shape[1] != H:
        raise ValueError(f"router_weight has hidden size {router_weight.shape[1]} (dim 1) but hidden_states has H={H}")
    dtype = torch.float32 if float32 else hidden_states.dtype
    if T == 0 or E == 0:
        return hidden_states.new_empty(T, E, dtype=dtype)
    if T > GEMV_TOKENS:
        if float32 and hidden_states.dtype in _MMA_DTYPES and router_weight.dtype == hidden_states.dtype:
            return _router_mma(hidden_states, router_weight)
        return hidden_states.to(dtype) @ router_weight.to(dtype).T
    out = torch.empty(T, E, dtype=dtype, device=hidden_states.device)
    block_t = next_pow2(T)
    block_e = min(next_pow2(max(1, E // _PROGRAMS)), max(1, _ELEMENTS // (block_t * 64)))
    block_h = min(next_pow2(H), max(64, _ELEMENTS // (block_t * block_e)))
    launch(_router_kernel, (cdiv(E, block_e),), (
        hidden_states, router_weight, out, T, E, H, hidden_states.stride(0), hidden_states.stride(1),
        router_weight.stride(0), router_weight.stride(1), out.stride(0), out.stride(1), block_t, block_e, block_h))
    return out
