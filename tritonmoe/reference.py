"""The oracle: every stage of the MoE forward pass in plain PyTorch, in high precision.

Tests compare the Triton kernels against these functions, stage by stage and whole.
Nothing here is fast; everything here is meant to be obviously right. Matmuls run in
``compute_dtype`` (float64 by default); expert weights are upcast one expert at a
time so the full-size models fit (DeepSeek-V3's w13 alone is 7.5e9 elements).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F_

from .specs import ModelSpec

__all__ = ["route", "selection_margin", "build_schedule", "permute", "gate_up_silu", "silu_mul", "down",
           "combine", "fused_experts", "moe_layer"]


def _topk_lowest_id(values: torch.Tensor, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k largest values per row, descending, ties to the lowest index.

    With ``eligible`` (bool, same shape), eligible entries rank before all others, so an
    eligible -inf still beats an ineligible one (the kernels select from an availability mask).
    """
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    if eligible is not None:
        first = torch.sort(eligible.gather(-1, order).to(torch.int8), dim=-1, descending=True, stable=True).indices
        order = order.gather(-1, first)
    return order[..., :k]


def _selection_scores(router_logits, spec: ModelSpec, correction_bias, compute_dtype):
    logits = router_logits.to(compute_dtype)
    scores = torch.softmax(logits, dim=-1) if spec.scoring == "softmax" else torch.sigmoid(logits)
    select = scores if correction_bias is None else scores + correction_bias.to(compute_dtype)
    # NaN never wins a selection (the kernels do the same), so ids stay valid; the weights keep the NaN.
    select = torch.nan_to_num(select, nan=float("-inf"))
    return scores, select


def _group_scores(select: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """(T, n_group): sum of each group's top ``group_score_topk`` selection scores."""
    grouped = select.view(select.shape[0], spec.n_group, spec.group_size)
    top = torch.sort(grouped, dim=-1, descending=True).values[..., : spec.group_score_topk]
    return top.sum(-1)


def _eligible(select: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """(T, E) bool: experts in the ``topk_group`` best groups (all experts when n_group == 1)."""
    T = select.shape[0]
    if spec.n_group == 1:
        return torch.ones_like(select, dtype=torch.bool)
    kept = _topk_lowest_id(_group_scores(select, spec), spec.topk_group)
    group_mask = torch.zeros(T, spec.n_group, dtype=torch.bool, device=select.device)
    group_mask.scatter_(1, kept, True)
    return group_mask.repeat_interleave(spec.group_size, dim=1)


def route(router_logits: torch.Tensor, spec: ModelSpec, *, correction_bias=None, compute_dtype=torch.float64):
    """Reference routing: (T, E) logits -> float32 (T, k) weights, int32 (T, k) expert ids.

    Ids are in selection order (largest selection score first, ties to the lowest id).
    """
    scores, select = _selection_scores(router_logits, spec, correction_bias, compute_dtype)
    ids = _topk_lowest_id(select, spec.top_k, _eligible(select, spec))
    weights = scores.gather(1, ids)
    if spec.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * spec.routed_scaling_factor
    return weights.float(), ids.to(torch.int32)


def selection_margin(router_logits: torch.Tensor, spec: ModelSpec, *, correction_bias=None) -> torch.Tensor:
    """(T,) float64: how far each token's selection is from a tie.

    The smallest gap between consecutive ranked selection scores down to the k-th, and
    between the kept and dropped group scores (exact ties excluded: both sides break them
    by the lowest id). Where it is below the kernels' rounding
    (~1e-6 in float32), a float32 kernel may legitimately pick a different expert; tests
    compare ids exactly only on tokens with a clear margin.
    """
    _, select = _selection_scores(router_logits, spec, correction_bias, torch.float64)
    eligible = _eligible(select, spec)
    ranked = torch.sort(select.masked_fill(~eligible, float("-inf")), dim=-1, descending=True).values
    n = min(spec.top_k + 1, spec.num_experts)  # the order of the first k, and the k-th vs the (k+1)-th
    margin = torch.full((select.shape[0],), float("inf"), dtype=torch.float64, device=select.device)
    if n > 1:
        margin = _nonzero_min(ranked[:, : n - 1] - ranked[:, 1:n])
    if spec.n_group > 1:
        g = torch.sort(_group_scores(select, spec), dim=-1, descending=True).values
        gg = spec.topk_group
        if gg < spec.n_group:
            margin = torch.minimum(margin, _nonzero_min(g[:, :gg] - g[:, 1 : gg + 1]))
    return torch.nan_to_num(margin, nan=0.0)


def _nonzero_min(gaps: torch.Tensor) -> torch.Tensor:
    # An exact 0 gap is a true tie of equal inputs: float32 sees the same tie and breaks it
    # the same way (lowest id), so it is no ambiguity.
    return gaps.masked_fill(gaps == 0, float("inf")).min(-1).values


# ----------------------------------------------------------------------------------------------
# Schedule and expert computation
# ----------------------------------------------------------------------------------------------

def build_schedule(topk_ids: torch.Tensor, num_experts: int):
    """Expert-sorted order of the T*k slots (slot = t*k + j), stable within an expert.

    Returns (expert_counts (E,), expert_offsets (E+1,), sorted_slots (T*k,), slot_positions (T*k,)),
    all int64. The Triton schedule adds the M-block map on top of exactly this order.
    """
    flat = topk_ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    sorted_slots = torch.sort(flat, stable=True).indices
    slot_positions = torch.empty_like(sorted_slots)
    slot_positions[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    return counts, offsets, sorted_slots, slot_positions


def permute(hidden_states: torch.Tensor, sorted_slots: torch.Tensor, top_k: int) -> torch.Tensor:
    """(T, H) -> (T*k, H): the token of each sorted slot."""
    return hidden_states[sorted_slots.long() // top_k]


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F_.silu(gate) * up


def gate_up_silu(x_sorted: torch.Tensor, w13: torch.Tensor, expert_offsets: torch.Tensor,
                 compute_dtype=torch.float64) -> torch.Tensor:
    """Sorted rows (S, H) -> silu(x Wg[e]^T) * (x Wu[e]^T), (S, F), in ``compute_dtype``."""
    F = w13.shape[1] // 2
    out = torch.zeros(x_sorted.shape[0], F, dtype=compute_dtype, device=x_sorted.device)
    for e in range(w13.shape[0]):
        lo, hi = int(expert_offsets[e]), int(expert_offsets[e + 1])
        if hi > lo:
            h = x_sorted[lo:hi].to(compute_dtype) @ w13[e].to(compute_dtype).T
            out[lo:hi] = silu_mul(h[:, :F], h[:, F:])
    return out


def down(inter_sorted: torch.Tensor, w2: torch.Tensor, expert_offsets: torch.Tensor,
         compute_dtype=torch.float64) -> torch.Tensor:
    """Sorted rows (S, F) -> (S, H) = inter W2[e]^T, unweighted, in ``compute_dtype``."""
    out = torch.zeros(inter_sorted.shape[0], w2.shape[1], dtype=compute_dtype, device=inter_sorted.device)
    for e in range(w2.shape[0]):
        lo, hi = int(expert_offsets[e]), int(expert_offsets[e + 1])
        if hi > lo:
            out[lo:hi] = inter_sorted[lo:hi].to(compute_dtype) @ w2[e].to(compute_dtype).T
    return out


def combine(expert_out_sorted: torch.Tensor, topk_weights: torch.Tensor, slot_positions: torch.Tensor,
            top_k: int) -> torch.Tensor:
    """Sorted expert outputs (S, H) -> (T, H) = sum_j w[t, j] * out[position of slot (t, j)]."""
    T = slot_positions.numel() // top_k
    rows = expert_out_sorted[slot_positions.long()].view(T, top_k, -1)
    return (rows * topk_weights.to(rows.dtype).unsqueeze(-1)).sum(1)


def fused_experts(hidden_states, w13, w2, topk_weights, topk_ids, *, compute_dtype=torch.float64):
    """Reference for ``tritonmoe.fused_experts``: (T, H) in ``compute_dtype``.

    out[t] = sum_j w[t, j] * W2[e] (silu(Wg[e] x_t) * Wu[e] x_t), e = topk_ids[t, j].
    """
    T, k = topk_ids.shape
    if T == 0:
        return hidden_states.new_zeros(0, hidden_states.shape[1], dtype=compute_dtype)
    _, offsets, sorted_slots, positions = build_schedule(topk_ids, w13.shape[0])
    x_sorted = permute(hidden_states, sorted_slots, k)
    inter = gate_up_silu(x_sorted, w13, offsets, compute_dtype)
    out = down(inter, w2, offsets, compute_dtype)
    return combine(out, topk_weights, positions, k)


def moe_layer(layer, hidden_states: torch.Tensor, *, compute_dtype=torch.float64) -> torch.Tensor:
    """Reference forward of a ``tritonmoe.MoELayer`` (its parameters, this module's arithmetic)."""
    spec = layer.spec
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    router_dtype = torch.float32 if spec.router_fp32 else x.dtype
    logits = x.to(router_dtype) @ layer.router_weight.to(router_dtype).T
    bias = layer.e_score_correction_bias if spec.uses_correction_bias else None
    weights, ids = route(logits, spec, correction_bias=bias, compute_dtype=compute_dtype)
    out = fused_experts(x, layer.w13, layer.w2, weights, ids, compute_dtype=compute_dtype)
    if spec.has_shared_expert:
        h = x.to(compute_dtype) @ layer.shared_w13[0].to(compute_dtype).T
        Fs = spec.shared_intermediate_size
        shared = silu_mul(h[:, :Fs], h[:, Fs:]) @ layer.shared_w2[0].to(compute_dtype).T
        if spec.shared_expert_gate:
            shared = shared * torch.sigmoid(x.to(compute_dtype) @ layer.shared_gate_weight.to(compute_dtype).T)
        out = out + shared
    return out.reshape(shape)
