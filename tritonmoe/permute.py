"""Moving rows between token order and expert-sorted order.

* ``permute`` (stage 2b): (T, H) tokens -> (T*k, H) rows in sorted order. The fused
  pipeline never calls it -- its first GEMM gathers rows through the schedule -- but the
  unfused pipeline (the preprint's ablation) does, and the paper times it on its own.
* ``combine`` (stage 5): (T*k, H) weighted expert outputs in slot order -> (T, H), summing
  each token's k rows in fp32 in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import await_previous, launch
from ._utils import cdiv, next_pow2
from .schedule import Schedule

__all__ = ["permute", "combine"]


@triton.jit
def _permute_kernel(x_ptr, out_ptr, sorted_slots_ptr, S, H, TOP_K, stride_xt, stride_xh, stride_om, stride_oh,
                    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, SLOT_ORDER: tl.constexpr, USE_GDC: tl.constexpr):
    await_previous(USE_GDC)
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)                   # [BR]
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)                                  # [BH]
    mask_r = offs_r < S
    mask = mask_r[:, None] & (offs_h[None, :] < H)
    if SLOT_ORDER:  # a slot schedule: row r is slot r
        tokens = offs_r // TOP_K
    else:
        tokens = (tl.load(sorted_slots_ptr + offs_r, mask=mask_r, other=0) // TOP_K).to(tl.int64)
    rows = tl.load(x_ptr + tokens[:, None] * stride_xt + offs_h[None, :] * stride_xh, mask=mask)
    tl.store(out_ptr + offs_r[:, None] * stride_om + offs_h[None, :] * stride_oh, rows, mask=mask)


@triton.jit
def _combine_kernel(rows_ptr, out_ptr, T, H, stride_rm, stride_rh, stride_ot, stride_oh,
                    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, USE_GDC: tl.constexpr):
    await_previous(USE_GDC)
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)                   # [BT]
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)                                  # [BH]
    mask = (offs_t[:, None] < T) & (offs_h[None, :] < H)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(rows_ptr + (offs_t[:, None] * TOP_K + j) * stride_rm + offs_h[None, :] * stride_rh,
                       mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_t[:, None] * stride_ot + offs_h[None, :] * stride_oh,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def permute(hidden_states: torch.Tensor, sched: Schedule) -> torch.Tensor:
    """(T, H) -> (T*k, H): row i is the token of sorted slot i (of slot i, for a slot schedule)."""
    S, H = sched.num_tokens * sched.top_k, hidden_states.shape[1]
    out = torch.empty(S, H, dtype=hidden_states.dtype, device=hidden_states.device)
    if S:
        block_r, block_h = 16, min(1024, next_pow2(H))
        launch(_permute_kernel, (cdiv(S, block_r), cdiv(H, block_h)), (
            hidden_states, out, sched.block_expert if sched.slot_blocks else sched.sorted_slots, S, H, sched.top_k,
            hidden_states.stride(0), hidden_states.stride(1), out.stride(0), out.stride(1), block_r, block_h,
            sched.slot_blocks))
    return out


def combine(slot_rows: torch.Tensor, top_k: int, out: torch.Tensor | None = None, *,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """(T*k, H) weighted rows in slot order (slot = t*k + j) -> (T, H) token sums.

    The result has ``dtype`` (default: that of ``slot_rows``) unless ``out`` is given.
    """
    S, H = slot_rows.shape
    if top_k < 1 or S % top_k:
        raise ValueError(f"combine: slot_rows has {S} rows, not a multiple of top_k={top_k}")
    T = S // top_k
    if out is None:
        out = torch.empty(T, H, dtype=dtype or slot_rows.dtype, device=slot_rows.device)
    if T:
        # A few tokens' rows in tiles of about T*H/64 elements (128 columns at least), so decode spreads over
        # tens of programs (4 programs of 1024 columns took 4.3 us at Qwen2 T=2, PERF_LOG v16); 4 x 1024
        # tiles once there are rows enough.
        block_t = min(4, next_pow2(T))
        block_h = min(1024, next_pow2(H), max(128, next_pow2(cdiv(T * H, 64 * block_t))))
        launch(_combine_kernel, (cdiv(T, block_t), cdiv(H, block_h)), (
            slot_rows, out, T, H, slot_rows.stride(0), slot_rows.stride(1), out.stride(0), out.stride(1),
            top_k, block_t, block_h))
    return out
