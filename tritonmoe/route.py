"""Stage 1 -- routing: gating, top-k and renormalisation fused in one kernel.

(T, E) router logits -> float32 (T, k) weights and int32 (T, k) expert ids, in the
order of selection. The schedule (``tritonmoe.schedule``) comes next.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import await_previous, launch
from ._utils import cdiv, check_tensor, next_pow2, SUPPORTED_DTYPES
from .specs import ModelSpec

__all__ = ["route"]

ONE_WARP_ELEMENTS = 256  # tiles of up to this many (token, expert) elements route in one warp (PERF_LOG v14, v20)


@triton.jit
def _argmax_available(select, available, offs_e, E_PAD: tl.constexpr):
    """Per row, the largest ``select`` among ``available`` columns, ties to the lowest column."""
    cand = tl.where(available, select, float("-inf"))                      # [BT, E_PAD]
    best = tl.max(cand, axis=1)                                             # [BT]
    hit = available & (cand == best[:, None])
    return tl.min(tl.where(hit, offs_e[None, :], E_PAD), axis=1)           # [BT]


@triton.jit
def _route_kernel(
    # pointers
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    # sizes and strides
    T, E, stride_lt, stride_le, scale,
    # meta-parameters
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, G_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr, GROUP_SCORE_TOPK: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    await_previous(USE_GDC)
    pid = tl.program_id(0).to(tl.int64)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)                          # [BT]
    offs_e = tl.arange(0, E_PAD)                                            # [E_PAD]
    mask_t = offs_t < T
    mask_e = offs_e < E
    x = tl.load(logits_ptr + offs_t[:, None] * stride_lt + offs_e[None, :] * stride_le,
                mask=mask_t[:, None] & mask_e[None, :], other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        row_max = tl.max(x, axis=1)
        p = tl.where(mask_e[None, :], tl.exp(x - row_max[:, None]), 0.0)
        scores = p / tl.sum(p, axis=1)[:, None]                             # [BT, E_PAD]
    select = scores
    if HAS_BIAS:
        select = select + tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    # NaN never wins a selection, so ids stay in range; the NaN stays in the weights.
    select = tl.where(select != select, float("-inf"), select)
    available = mask_e[None, :] & (offs_t[:, None] >= 0)                    # [BT, E_PAD]

    if N_GROUP > 1:
        # Group-limited selection (DeepSeek-V3): keep the TOPK_GROUP groups whose top
        # GROUP_SCORE_TOPK selection scores sum highest.
        group_of = offs_e // GROUP_SIZE
        offs_g = tl.arange(0, G_PAD)
        if N_GROUP * GROUP_SIZE == E_PAD:
            # Groups tile the row exactly (E a power of two): every group's top scores at once, as
            # [BT, N_GROUP, GROUP_SIZE] reductions, and the kept groups by rank in one more; the loop
            # below takes a chain of about 40 row reductions for DeepSeek-V3 (PERF_LOG v16).
            offs_in = tl.arange(0, GROUP_SIZE)                               # position within a group
            sel = tl.reshape(tl.where(available, select, float("-inf")), (BLOCK_T, N_GROUP, GROUP_SIZE))
            group_score = tl.zeros((BLOCK_T, N_GROUP), tl.float32)
            for _ in tl.static_range(GROUP_SCORE_TOPK):
                best = tl.max(sel, axis=2)                                   # [BT, NG]
                first = tl.min(tl.where(sel == best[:, :, None], offs_in[None, None, :], GROUP_SIZE), axis=2)
                group_score += best
                sel = tl.where(offs_in[None, None, :] == first[:, :, None], float("-inf"), sel)
            group_score = tl.where(group_score != group_score, float("-inf"), group_score)
            # a group's rank: the groups that beat it (a higher score, or the same and a lower index)
            beats = ((group_score[:, :, None] > group_score[:, None, :]) |
                     ((group_score[:, :, None] == group_score[:, None, :]) &
                      (offs_g[:, None] < offs_g[None, :])[None, :, :]))              # [BT, h, g]: h beats g
            kept = tl.sum(beats.to(tl.int32), axis=1) < TOPK_GROUP                   # [BT, NG]
            eligible = tl.reshape(tl.broadcast_to(kept[:, :, None], (BLOCK_T, N_GROUP, GROUP_SIZE)),
                                  (BLOCK_T, E_PAD))
        else:
            group_score = tl.full((BLOCK_T, G_PAD), float("-inf"), tl.float32)
            for g in tl.static_range(N_GROUP):
                in_group = available & (group_of[None, :] == g)
                total = tl.zeros((BLOCK_T,), tl.float32)
                for _ in tl.static_range(GROUP_SCORE_TOPK):
                    i = _argmax_available(select, in_group, offs_e, E_PAD)
                    total += tl.sum(tl.where(offs_e[None, :] == i[:, None], select, 0.0), axis=1)
                    in_group = in_group & (offs_e[None, :] != i[:, None])
                group_score = tl.where(offs_g[None, :] == g, total[:, None], group_score)
            group_score = tl.where(group_score != group_score, float("-inf"), group_score)
            group_free = (offs_g[None, :] < N_GROUP) & (offs_t[:, None] >= 0)
            eligible = offs_t[:, None] < 0                                   # all False, [BT, E_PAD]
            for _ in tl.static_range(TOPK_GROUP):
                gi = _argmax_available(group_score, group_free, offs_g, G_PAD)
                group_free = group_free & (offs_g[None, :] != gi[:, None])
                eligible = eligible | (group_of[None, :] == gi[:, None])
        available = available & eligible

    offs_k = tl.arange(0, K_PAD)
    top_w = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    top_i = tl.zeros((BLOCK_T, K_PAD), tl.int32)
    for j in tl.static_range(TOP_K):
        i = _argmax_available(select, available, offs_e, E_PAD)
        w = tl.sum(tl.where(offs_e[None, :] == i[:, None], scores, 0.0), axis=1)
        available = available & (offs_e[None, :] != i[:, None])
        top_w = tl.where(offs_k[None, :] == j, w[:, None], top_w)
        top_i = tl.where(offs_k[None, :] == j, i[:, None].to(tl.int32), top_i)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    top_w = top_w * scale
    out_mask = mask_t[:, None] & (offs_k[None, :] < TOP_K)
    out_offs = offs_t[:, None] * TOP_K + offs_k[None, :]
    tl.store(weights_ptr + out_offs, top_w, mask=out_mask)
    tl.store(ids_ptr + out_offs, top_i.to(ids_ptr.dtype.element_ty), mask=out_mask)


def _tile(T: int, e_pad: int) -> tuple[int, int]:
    """(tokens per program, warps) of the routing kernel. The selection is a chain of dozens of row
    reductions (DeepSeek-V3: about 80); across 4 warps each goes through shared memory and a barrier,
    within one warp through shuffles. So a tile of up to 256 (token, expert) elements runs in one warp,
    and with 64+ experts every T does: one token per warp at E = 256 took 20 us at T = 8192 where 16
    tokens in 4 warps took 55, Qwen2's 4 tokens per warp 6-8 us where 64 in 4 warps took 12 (H100,
    ``probe_front``, PERF_LOG v20). With fewer experts, tiles of up to 64 tokens in 4 warps (Mixtral:
    5.1 us at T = 8192, 32 tokens in one warp 5.5)."""
    if e_pad >= 64:
        return max(1, min(next_pow2(T), ONE_WARP_ELEMENTS // e_pad)), 1
    block_t = max(1, min(next_pow2(T), 4096 // e_pad, 64))
    return block_t, 1 if block_t * e_pad <= ONE_WARP_ELEMENTS else 4


def route(router_logits: torch.Tensor, spec: ModelSpec, *, correction_bias: torch.Tensor | None = None,
          ids_dtype: torch.dtype = torch.int32):
    """Route tokens to experts as ``spec``'s model does.

    Args:
        router_logits: (T, E) float16/bfloat16/float32, any strides.
        spec: a ``ModelSpec``; its routing fields are used.
        correction_bias: (E,) DeepSeek-V3's ``e_score_correction_bias``: required when
            ``spec.uses_correction_bias``, refused otherwise.
        ids_dtype: torch.int32 (default) or torch.int64 (what torch.topk returns, written directly:
            no cast launch where a caller needs int64).

    Returns:
        ``(topk_weights, topk_ids)``: float32 (T, k) and ``ids_dtype`` (T, k), largest selection
        first, ties to the lowest expert id. Non-finite logits: NaN never selects an
        expert (ids stay valid) but leaves the token's weights NaN, so its output is NaN;
        -inf is a probability of 0; +inf under softmax gives NaN weights.
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a tritonmoe.ModelSpec, got {type(spec).__name__}")
    check_tensor("router_logits", router_logits, ndim=2, dtypes=SUPPORTED_DTYPES)
    T, E = router_logits.shape
    if E != spec.num_experts:
        raise ValueError(f"router_logits has {E} experts (dim 1) but spec {spec.name!r} has "
                         f"num_experts={spec.num_experts}")
    if spec.uses_correction_bias:
        if correction_bias is None:
            raise ValueError(f"correction_bias is required: spec {spec.name!r} selects on scores + "
                             "e_score_correction_bias")
        check_tensor("correction_bias", correction_bias, ndim=1, dtypes=SUPPORTED_DTYPES,
                     device=router_logits.device)
        if correction_bias.shape[0] != E:
            raise ValueError(f"correction_bias has {correction_bias.shape[0]} entries, expected E={E}")
        correction_bias = correction_bias.contiguous()
    elif correction_bias is not None:
        raise ValueError(f"correction_bias given, but spec {spec.name!r} does not use one "
                         "(uses_correction_bias=False)")
    if ids_dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids_dtype must be torch.int32 or torch.int64, got {ids_dtype}")
    k = spec.top_k
    weights = torch.empty(T, k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, k, dtype=ids_dtype, device=router_logits.device)
    if T == 0:
        return weights, ids
    e_pad = next_pow2(E)
    block_t, warps = _tile(T, e_pad)
    launch(_route_kernel, (cdiv(T, block_t),), (
        router_logits, correction_bias if correction_bias is not None else weights, weights, ids,
        T, E, router_logits.stride(0), router_logits.stride(1), float(spec.routed_scaling_factor),
        k, next_pow2(k), spec.scoring == "sigmoid", spec.renormalize,  # TOP_K, K_PAD, SIGMOID, RENORMALIZE
        correction_bias is not None, spec.n_group, next_pow2(spec.n_group), spec.topk_group,  # HAS_BIAS .. TOPK_GROUP
        spec.group_size, spec.group_score_topk, block_t, e_pad), num_warps=warps)  # GROUP_SIZE .. E_PAD
    return weights, ids
