"""The MoE forward pass: validate the arguments, then chain the stages.

route (tritonmoe.route) -> build_schedule (or a slot schedule, no launch) -> [fused] gate_up_silu -> grouped_gemm (down,
weighted, scattered to slots) -> combine. The unfused pipeline (``fused=False``, the
preprint's ablation) replaces the first GEMM by permute -> gate GEMM -> up GEMM -> silu_mul.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ._utils import SUPPORTED_DTYPES, check_matmul_dtype, check_tensor
from .configs import get_chunk_tokens, get_tiles
from .gemm import gate_up_silu, grouped_gemm, silu_mul
from .permute import combine, permute
from .schedule import build_schedule, slot_schedule

__all__ = ["fused_experts", "check_routing", "check_expert_weights"]

INDEX_DTYPES = (torch.int32, torch.int64)
SCHEDULES = ("expert_groups", "fixed", "tail_tiles", "slots")
TAIL_TILES_MIN_BLOCK_M = 16  # schedule="tail_tiles" with tiles that set no min_block_m
# schedule="expert_groups" runs a slot schedule up to this many tokens: at T = 1 the same blocks with no
# schedule kernel; at T = 2 a shared expert's blocks read its weights twice, and the graph replays were
# still 0.5-1.3 % faster on the H100 for all three models; at T = 4 mixed (PERF_LOG v16).
SLOT_SCHEDULE_MAX_TOKENS = 2
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_routing(hidden_states, topk_weights, topk_ids, num_experts: int, experts_name: str = "E"):
    """Checks of the routing against the tokens and the expert count; returns (T, H, k).

    Expert ids out of range are caught here on the CPU, where it is free; on the GPU the
    schedule's histogram kernel asserts on the device instead (no host sync).
    """
    check_tensor("hidden_states", hidden_states, ndim=2, dtypes=SUPPORTED_DTYPES)
    dev = hidden_states.device
    check_tensor("topk_weights", topk_weights, ndim=2, dtypes=WEIGHT_DTYPES, device=dev)
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    T = hidden_states.shape[0]
    if topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} tokens but hidden_states has T={T}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights shape {tuple(topk_weights.shape)} != topk_ids shape "
                         f"{tuple(topk_ids.shape)}")
    k = topk_ids.shape[1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k (topk_ids dim 1) must be in [1, {experts_name}={num_experts}], got {k}")
    if dev.type == "cpu" and T:
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids has expert ids in [{lo}, {hi}], outside [0, {experts_name}={num_experts})")
    return T, hidden_states.shape[1], k


def check_expert_weights(hidden_states, w13, w2, *, names=("w13", "w2"), dims="(E, H, F)",
                         num_experts: int | None = None, experts_note: str = ""):
    """Checks of the expert weights against ``hidden_states`` (checked already); returns (E, F).

    ``num_experts``, if given, is the number of experts ``w13`` must hold (``experts_note`` says why).
    """
    n13, n2 = names
    dev, dtype, H = hidden_states.device, hidden_states.dtype, hidden_states.shape[1]
    check_tensor(n13, w13, ndim=3, dtypes=SUPPORTED_DTYPES, device=dev)
    check_tensor(n2, w2, ndim=3, dtypes=SUPPORTED_DTYPES, device=dev)
    for name, t in ((n13, w13), (n2, w2)):
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden_states has {dtype}; they must match")
    E, two_f, h13 = w13.shape
    if num_experts is not None and E != num_experts:
        raise ValueError(f"{n13} holds {E} experts (dim 0) but {experts_note} = {num_experts}")
    if h13 != H:
        raise ValueError(f"{n13} has hidden size {h13} (dim 2) but hidden_states has H={H}")
    if two_f % 2 or two_f == 0:
        raise ValueError(f"{n13} dim 1 must be 2*F (gate rows then up rows), got {two_f}")
    F = two_f // 2
    if tuple(w2.shape) != (E, H, F):
        raise ValueError(f"{n2} must have shape {dims} = {(E, H, F)} to match {n13} {tuple(w13.shape)} and "
                         f"hidden_states, got {tuple(w2.shape)}")
    return E, F


def _check_args(hidden_states, w13, w2, topk_weights, topk_ids):
    check_tensor("hidden_states", hidden_states, ndim=2, dtypes=SUPPORTED_DTYPES)
    check_matmul_dtype("hidden_states", hidden_states.dtype)
    E, F = check_expert_weights(hidden_states, w13, w2)
    T, H, k = check_routing(hidden_states, topk_weights, topk_ids, E)
    return T, H, E, F, k


@functools.lru_cache(maxsize=256)  # a cached lookup: small-T forwards are bound by host time
def _schedule_tiles(tiles, schedule: str):
    """``tiles`` as ``schedule`` runs them: groups of M-blocks within one expert for "expert_groups" alone;
    tail tiles down to ``tiles.min_block_m`` where it is set, and down to 16 at least for "tail_tiles"."""
    min_block_m = tiles.min_block_m or (TAIL_TILES_MIN_BLOCK_M if schedule == "tail_tiles" else 0)
    return dataclasses.replace(tiles, min_block_m=min_block_m, expert_groups=schedule == "expert_groups")


def fused_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, *, fused: bool = True, tiles=None,
                  schedule: str = "expert_groups", chunk_tokens: int | None = None) -> torch.Tensor:
    """Routed experts of an MoE layer: (T, H) -> (T, H).

    ``out[t] = sum_j topk_weights[t, j] * W2[e] (silu(Wg[e] x_t) * Wu[e] x_t)``, ``e = topk_ids[t, j]``.

    Args:
        hidden_states: (T, H) float16/bfloat16/float32, any strides.
        w13: (E, 2F, H), same dtype: rows [0, F) gate, [F, 2F) up (transformers' ``gate_up_proj``).
        w2: (E, H, F), same dtype (transformers' ``down_proj``).
        topk_weights: (T, k) floating; used in float32.
        topk_ids: (T, k) int32/int64 in [0, E). Checked on the CPU before running; on a GPU an
            out-of-range id trips a device-side assertion in the schedule (no host sync).
        fused: False runs the unfused pipeline (permute, gate GEMM, up GEMM, activation).
        tiles: optional ``(gate_up, down)`` ``TileConfig`` pair overriding the tuned tables; their
            block_m may differ (the down projection then gets its own block map, one more launch or three).
        schedule: M-blocks are block_m rows tall (an expert's last, partial one with the smallest
            tile height down to ``tiles.min_block_m`` that holds its rows, where the tiles set it:
            the tuned tables do per bucket, PERF_LOG v15; with ``tiles.absorb_m`` an expert's last whole
            block also runs up to that many rows after it, PERF_LOG v18), and up to group_m M-blocks sweep the
            output columns together (L2 reuse). "expert_groups" (default): a group never spans two
            experts, so a skewed expert's blocks share its weight reads wherever they start
            (experiments/PERF_LOG.md, v9); "fixed": groups of group_m consecutive blocks (the
            preprint's design); "tail_tiles": as "fixed", with tail tiles down to 16 rows at least
            (PERF_LOG v4: slower than "fixed" on the H100 at 8192 tokens); "slots": every slot (token,
            choice) its own M-block of one row, its expert read from ``topk_ids`` by the GEMMs, so no
            schedule is built (no launch): what "expert_groups" runs up to ``SLOT_SCHEDULE_MAX_TOKENS``
            (2) tokens (for one token the k choices are k distinct experts: the same blocks; PERF_LOG v16).
        chunk_tokens: run the forward in chunks of this many tokens, each with its own schedule
            and tiles. Default: the tuned table's choice for the device and shape (on the H100,
            Mixtral-8x7B at T >= 8192 runs in chunks of 4096, measured faster: experiments/PERF_LOG.md,
            v7), else one piece; with explicit ``tiles``, one piece.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    T, H, E, F, k = _check_args(hidden_states, w13, w2, topk_weights, topk_ids)
    if T == 0:
        return hidden_states.new_empty(0, H)
    # Read as they are (the kernels narrow ids after their range check and compute in float32):
    # a cast would be one more launch, and small T is bound by host time.
    weights = topk_weights if topk_weights.is_contiguous() else topk_weights.contiguous()
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    if chunk_tokens is not None and (type(chunk_tokens) is not int or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    chunk = chunk_tokens or (None if tiles is not None else
                             get_chunk_tokens(T, E, F, H, hidden_states.dtype, hidden_states.device))
    if chunk is None or T <= chunk:
        return _forward(hidden_states, w13, w2, weights, ids, fused, tiles, schedule)
    out = torch.empty(T, H, dtype=hidden_states.dtype, device=hidden_states.device)
    for t0 in range(0, T, chunk):
        rows = slice(t0, t0 + chunk)
        _forward(hidden_states[rows], w13, w2, weights[rows], ids[rows], fused, tiles, schedule, out=out[rows])
    return out


def _forward(hidden_states, w13, w2, weights, ids, fused, tiles, schedule, out=None):
    """One chunk of tokens through the stages; ``weights`` and ``ids`` contiguous."""
    (T, H), (E, two_f, _), k = hidden_states.shape, w13.shape, ids.shape[1]
    F = two_f // 2
    gate_up_tiles, down_tiles = tiles if tiles is not None else get_tiles(T, k, E, F, H, hidden_states.dtype,
                                                                          hidden_states.device)
    gate_up_tiles, down_tiles = _schedule_tiles(gate_up_tiles, schedule), _schedule_tiles(down_tiles, schedule)
    walks_blocks = gate_up_tiles.walks_blocks or down_tiles.walks_blocks  # need a built schedule
    if schedule == "slots" or (schedule == "expert_groups" and T <= SLOT_SCHEDULE_MAX_TOKENS and not walks_blocks):
        sched = down_sched = slot_schedule(ids, E)
    else:
        sched = build_schedule(ids, E, *gate_up_tiles.block_map)
        # The sorted order does not depend on the block map, so a down projection with other M-blocks only
        # needs its own block map over the same rows: one more schedule build (the tuner weighs it in).
        same = down_tiles.block_map == gate_up_tiles.block_map
        down_sched = sched if same else build_schedule(ids, E, *down_tiles.block_map)
    if fused:
        inter = gate_up_silu(hidden_states, w13, sched, gate_up_tiles)
    else:
        x_sorted = permute(hidden_states, sched)
        gate = grouped_gemm(x_sorted, w13, sched, gate_up_tiles, n_offset=0, n=F)
        up = grouped_gemm(x_sorted, w13, sched, gate_up_tiles, n_offset=F, n=F)
        inter = silu_mul(gate, up)
    if down_tiles.atomic_combine:  # the down projection adds its rows into the output: no combine
        return grouped_gemm(inter, w2, down_sched, down_tiles, topk_weights=weights, out=out)
    slot_rows = grouped_gemm(inter, w2, down_sched, down_tiles, topk_weights=weights)
    return combine(slot_rows, k * down_tiles.split_k, out, dtype=hidden_states.dtype)
