"""Expert parallelism (EP) over ``torch.distributed``: each rank holds E/world of the experts.

Rank r owns experts ``[r*E/world, (r+1)*E/world)`` (contiguous) and its own tokens. One call:

1. ``build_schedule`` on this rank's (T_r, k) global ids: the T_r*k slots in expert order,
   hence also in destination-rank order, and the per-expert counts (no host sync).
2. ``all_to_all_single`` of the per-rank counts (a device tensor), then **one host sync** to
   turn sent/received counts into split lists (``all_to_all_single`` takes Python lists).
3. ``all_to_all_single`` of the rows (``permute``: H values a slot) and of each slot's local
   expert id and routing weight.
4. The owning rank runs ``fused_experts`` on what it received with k = 1 (id = local expert,
   weight = routing weight): weighted rows, one a received slot.
5. ``all_to_all_single`` of the weighted rows back; the sender puts them in slot order and sums
   each token's k rows with ``combine`` (fp32, fixed order: deterministic).

``ep_fused_experts`` is 1-5; ``ep_dispatch`` (1-3) and ``ep_combine`` (5) are its halves, for
callers that run their own experts or time the stages. ``EPMoELayer`` is ``MoELayer`` with its
experts split across ranks. Every rank must take part in every call, also one with no tokens
(empty tensors go through the same collectives). Works with gloo (CPU tensors, Triton
interpreter) and NCCL (CUDA tensors). Design and costs: docs/EXPERT_PARALLEL.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ._utils import SUPPORTED_DTYPES, check_tensor
from .functional import check_expert_weights, check_routing, fused_experts
from .layer import MoELayer
from .permute import combine, permute
from .route import route
from .schedule import build_schedule
from .specs import ModelSpec

__all__ = ["ep_fused_experts", "ep_dispatch", "ep_combine", "EPDispatch", "EPMoELayer", "expert_range"]

# The dispatch schedule only orders slots; its GEMM block map is unused, so any valid block_m.
_SORT_BLOCK_M = 16


def expert_range(num_experts: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, end)`` of the global expert ids that ``rank`` owns (contiguous split)."""
    per_rank = num_experts // world_size
    return rank * per_rank, (rank + 1) * per_rank


@dataclass
class EPDispatch:
    """What ``ep_dispatch`` received on this rank, and how ``ep_combine`` sends results back.

    Received rows come grouped by source rank (rank 0's first), each source's rows in
    expert order; ``ep_combine`` expects one output row per received row, in the same order.
    """

    hidden_states: torch.Tensor   # (R, H) received token rows, the input's dtype
    expert_ids: torch.Tensor      # (R, 1) int32 local expert id of each row, in [0, E/world)
    weights: torch.Tensor         # (R, 1) float32 routing weight of each row
    send_splits: list[int]        # rows this rank sent to each rank (sums to T*k)
    recv_splits: list[int]        # rows this rank received from each rank (sums to R)
    slot_positions: torch.Tensor  # (T*k,) int32: where each of this rank's slots was in the sent order
    num_tokens: int               # T of this rank
    top_k: int                    # k
    group: object                 # the process group (None: the default group)


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert parallelism needs an initialized torch.distributed process group: call "
                           "torch.distributed.init_process_group first (gloo on the CPU, nccl on CUDA)")
    return dist.get_rank(group), dist.get_world_size(group)


def _check_num_experts(num_experts, world: int) -> int:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if num_experts % world:
        raise ValueError(f"num_experts={num_experts} is not divisible by the world size {world}: experts are "
                         "split contiguously, num_experts / world_size per rank")
    return num_experts // world


def _check_routing(hidden_states, topk_weights, topk_ids, num_experts: int):
    """Checks of the arguments every rank passes for its own tokens; no communication.
    topk_ids are global expert ids."""
    return check_routing(hidden_states, topk_weights, topk_ids, num_experts, experts_name="num_experts")


def _check_experts(hidden_states, w13_local, w2_local, per_rank: int, num_experts: int, world: int):
    check_expert_weights(hidden_states, w13_local, w2_local, names=("w13_local", "w2_local"), dims="(E/world, H, F)",
                         num_experts=per_rank, experts_note=f"num_experts / world size = {num_experts} / {world}")


def _dispatch(hidden_states, topk_weights, topk_ids, num_experts: int, group) -> EPDispatch:
    _, world = _world(group)
    per_rank = num_experts // world
    T, H = hidden_states.shape
    k = topk_ids.shape[1]
    ids = topk_ids.to(torch.int32).contiguous()
    # Expert order is destination-rank order (experts are split contiguously), and the schedule
    # builds it on the device, stable in slot order, with no host sync.
    sched = build_schedule(ids, num_experts, _SORT_BLOCK_M)
    sorted_slots = sched.sorted_slots.long()
    send_counts = sched.expert_counts.view(world, per_rank).sum(1, dtype=torch.int64)   # (world,)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    # The one host sync: all_to_all_single takes its split sizes as Python lists, and the
    # receiver must size its buffers. One copy brings both lists.
    splits = torch.cat([send_counts, recv_counts]).tolist()
    send_splits, recv_splits = splits[:world], splits[world:]
    R = sum(recv_splits)

    x_send = permute(hidden_states, sched)                                               # (T*k, H)
    local_ids = ids.view(-1)[sorted_slots] % per_rank
    weights = topk_weights.reshape(-1).to(torch.float32)[sorted_slots]
    # Id and weight travel together as int32 pairs (the weight's bits, not its value): one
    # collective instead of two, exact for any id.
    meta_send = torch.stack([local_ids, weights.view(torch.int32)], dim=1)               # (T*k, 2)
    x_recv = hidden_states.new_empty(R, H)
    meta_recv = meta_send.new_empty(R, 2)
    dist.all_to_all_single(x_recv, x_send, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                           group=group)
    dist.all_to_all_single(meta_recv, meta_send, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                           group=group)
    return EPDispatch(
        hidden_states=x_recv, expert_ids=meta_recv[:, :1],
        weights=meta_recv[:, 1].contiguous().view(torch.float32).unsqueeze(1),
        send_splits=send_splits, recv_splits=recv_splits, slot_positions=sched.slot_positions,
        num_tokens=T, top_k=k, group=group)


def ep_dispatch(hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                num_experts: int, group=None) -> EPDispatch:
    """Send each of this rank's T*k slots to the rank that owns its expert.

    Args:
        hidden_states: (T, H) float16/bfloat16/float32 tokens of this rank (T may be 0).
        topk_weights: (T, k) floating routing weights (sent as float32).
        topk_ids: (T, k) int32/int64 global expert ids in [0, num_experts).
        num_experts: E, divisible by the group's size.
        group: the process group (None: the default group).

    Returns an ``EPDispatch``: the rows this rank received for its experts, with their local
    expert ids and weights; give one output row per received row to ``ep_combine``.
    Collective: every rank of the group must call it. One host sync (the split sizes).
    """
    _, world = _world(group)
    _check_num_experts(num_experts, world)
    _check_routing(hidden_states, topk_weights, topk_ids, num_experts)
    return _dispatch(hidden_states, topk_weights, topk_ids, num_experts, group)


def ep_combine(expert_out: torch.Tensor, handle: EPDispatch) -> torch.Tensor:
    """Send (R, H) rows (one per row ``handle`` received, already weighted) back to their
    tokens' ranks and sum each token's k rows: returns this rank's (T, H), fp32-accumulated.
    Collective: every rank of the group must call it."""
    R = sum(handle.recv_splits)
    check_tensor("expert_out", expert_out, ndim=2, dtypes=SUPPORTED_DTYPES)
    if expert_out.shape[0] != R:
        raise ValueError(f"expert_out has {expert_out.shape[0]} rows but this rank received R={R}")
    H = expert_out.shape[1]
    back = expert_out.new_empty(handle.num_tokens * handle.top_k, H)                 # in the sent order
    dist.all_to_all_single(back, expert_out.contiguous(), output_split_sizes=handle.send_splits,
                           input_split_sizes=handle.recv_splits, group=handle.group)
    # Slot order (slot = t*k + j) is what combine sums over; a gather, as the rows come back
    # in the order they were sent.
    return combine(back[handle.slot_positions.long()], handle.top_k)


def ep_fused_experts(hidden_states: torch.Tensor, w13_local: torch.Tensor, w2_local: torch.Tensor,
                     topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, num_experts: int, group=None,
                     fused: bool = True) -> torch.Tensor:
    """Routed experts with the experts split across the ranks of ``group``: (T, H) -> (T, H).

    The same result as ``tritonmoe.fused_experts`` on the full weights, for this rank's tokens.

    Args:
        hidden_states: (T, H) float16/bfloat16/float32, this rank's tokens (T may be 0).
        w13_local: (E/world, 2F, H), same dtype: this rank's experts ``expert_range(E, rank, world)``,
            gate rows then up rows.
        w2_local: (E/world, H, F), same dtype.
        topk_weights: (T, k) floating; used in float32.
        topk_ids: (T, k) int32/int64 *global* expert ids in [0, num_experts).
        num_experts: E, divisible by the world size.
        group: the process group (None: the default group).
        fused: False runs the unfused pipeline on the received rows.

    Collective: every rank of the group must call it, also with T = 0. Arguments are checked
    before any communication; a rank that raises leaves the others waiting in the first
    collective until the group's timeout. One host sync (the split sizes, see ``ep_dispatch``).
    """
    _, world = _world(group)
    per_rank = _check_num_experts(num_experts, world)
    _check_routing(hidden_states, topk_weights, topk_ids, num_experts)
    _check_experts(hidden_states, w13_local, w2_local, per_rank, num_experts, world)
    handle = _dispatch(hidden_states, topk_weights, topk_ids, num_experts, group)
    # k = 1 on the receiving side: each received row is one slot with one expert and weight.
    rows = fused_experts(handle.hidden_states, w13_local, w2_local, handle.weights, handle.expert_ids,
                         fused=fused)
    return ep_combine(rows, handle)


class EPMoELayer(nn.Module):
    """``MoELayer`` with its routed experts split across the ranks of a process group.

    Every rank holds the full router (and ``e_score_correction_bias``, and the shared expert,
    which each rank computes for its own tokens) and only experts ``expert_range(E, rank,
    world_size)``: ``w13`` (E/world, 2F, H), ``w2`` (E/world, H, F). Parameter names and layouts
    are ``MoELayer``'s. ``forward`` takes this rank's (..., H) tokens and returns (..., H); it is
    collective (every rank calls it, also with no tokens).

    Args:
        spec: the model's ``ModelSpec``; ``spec.num_experts`` must be divisible by the world size.
        rank, world_size: this rank's place; both or neither (neither: read from ``group``, which
            must then be initialized). ``forward`` checks them against the group.
        group: the process group the experts are split over (None: the default group).
        dtype, device, fused: as ``MoELayer``.

    The random initialisation (``reset_parameters``, ``MoELayer``'s) draws the local shapes, so
    it does not match a ``MoELayer``'s; ``from_layer`` slices a full layer instead.
    """

    # The same code as the single-device layer, on this layer's (replicated) router.
    router_logits = MoELayer.router_logits
    reset_parameters = MoELayer.reset_parameters
    _make_parameters = MoELayer._make_parameters

    def __init__(self, spec: ModelSpec, *, rank: int | None = None, world_size: int | None = None, group=None,
                 dtype: torch.dtype | None = None, device=None, fused: bool = True):
        super().__init__()
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"spec must be a tritonmoe.ModelSpec, got {type(spec).__name__}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then they are read from group)")
        if rank is None:
            rank, world_size = _world(group)
        for name, v in (("rank", rank), ("world_size", world_size)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}, "
                             f"world_size={world_size}")
        E = spec.num_experts
        if E % world_size:
            raise ValueError(f"spec.num_experts={E} is not divisible by world_size={world_size}: experts are "
                             "split contiguously, num_experts / world_size per rank")
        self.spec, self.fused, self.group, self.rank, self.world_size = spec, fused, group, rank, world_size
        self.expert_start, self.expert_end = expert_range(E, rank, world_size)
        self._make_parameters(E // world_size, dtype, device)
        self.reset_parameters()

    @classmethod
    def from_layer(cls, layer: MoELayer, *, rank: int | None = None, world_size: int | None = None, group=None,
                   device=None) -> "EPMoELayer":
        """This rank's part of a full single-device ``layer``: the same outputs, experts sliced.

        ``device`` defaults to the layer's (with NCCL, pass this rank's GPU). Copies; the
        full layer is not kept.
        """
        if not isinstance(layer, MoELayer):
            raise TypeError(f"layer must be a tritonmoe.MoELayer, got {type(layer).__name__}")
        device = layer.w13.device if device is None else torch.device(device)
        # Built on the meta device so no random weights are drawn only to be overwritten.
        ep = cls(layer.spec, rank=rank, world_size=world_size, group=group, dtype=layer.w13.dtype, device="meta",
                 fused=layer.fused)
        ep.to_empty(device=device)
        state = layer.state_dict()
        for name in ("w13", "w2"):
            state[name] = state[name][ep.expert_start:ep.expert_end]
        ep.load_state_dict(state)
        return ep

    # One implementation of the shared expert: MoELayer's (each rank runs it for its own tokens).
    shared_expert = MoELayer.shared_expert

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        H = self.spec.hidden_size
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != H:
            raise ValueError(f"hidden_states must have shape (..., {H}), got {tuple(hidden_states.shape)}")
        rank, world = _world(self.group)
        if (rank, world) != (self.rank, self.world_size):
            raise RuntimeError(f"this layer holds the experts of rank {self.rank} of {self.world_size}, but the "
                               f"process group says rank {rank} of {world}")
        x = hidden_states.reshape(-1, H)
        weights, ids = route(self.router_logits(x), self.spec, correction_bias=self.e_score_correction_bias)
        out = ep_fused_experts(x, self.w13, self.w2, weights, ids, num_experts=self.spec.num_experts,
                               group=self.group, fused=self.fused)
        if self.spec.has_shared_expert:
            out = out + self.shared_expert(x)
        return out.reshape(hidden_states.shape)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{s.name}: H={s.hidden_size}, F={s.intermediate_size}, E={s.num_experts} "
                f"(experts [{self.expert_start}, {self.expert_end}) here, rank {self.rank} of {self.world_size}), "
                f"k={s.top_k}, shared={s.shared_intermediate_size}, fused={self.fused}")
