"""tritonmoe's forward and router as PyTorch custom operators: ``torch.ops.tritonmoe.fused_experts``
and ``torch.ops.tritonmoe.route``.

``torch.compile`` sees each op as one opaque node, so a compiled model keeps a single graph
around the Triton launches (on the CPU the interpreter runs inside the op at run time), and
the fake (meta) implementation derives the output from the inputs' symbolic shapes, so the
token count T stays dynamic: one compiled graph serves every batch size.

    out = torch.ops.tritonmoe.fused_experts(x, w13, w2, topk_weights, topk_ids)
    weights, ids = torch.ops.tritonmoe.route(router_logits, top_k, "softmax", renormalize=True)

Inference only: no backward is registered (autograd raises if one is asked for). A custom op's
dispatch costs tens of microseconds of host time per call, which a small-T forward cannot hide:
eager callers that need no graph (``tritonmoe.integrations.transformers`` outside
``torch.compile``) call the functions behind the ops directly.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .functional import fused_experts as _fused_experts
from .route import route as _route
from .specs import ModelSpec

__all__ = ["fused_experts", "route", "route_by_fields"]


@torch.library.custom_op("tritonmoe::fused_experts", mutates_args=())
def fused_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """``tritonmoe.fused_experts`` (same arguments, without ``tiles``) as a custom op: (T, H) -> (T, H)."""
    return _fused_experts(hidden_states, w13, w2, topk_weights, topk_ids, fused=fused)


@fused_experts.register_fake
def _fused_experts_fake(hidden_states, w13, w2, topk_weights, topk_ids, fused=True):
    # Only the checks that need no data: the real op validates the rest (ids in range, dtypes)
    # when it runs. T may be symbolic, so equalities involving it go through torch._check.
    for name, t, ndim in (("hidden_states", hidden_states, 2), ("w13", w13, 3), ("w2", w2, 3),
                          ("topk_weights", topk_weights, 2), ("topk_ids", topk_ids, 2)):
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    T, H = hidden_states.shape
    E, two_f, h13 = w13.shape
    if h13 != H or tuple(w2.shape) != (E, H, two_f // 2):
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} must be (E, 2F, H) and (E, H, F) "
                         f"with H={H} from hidden_states")
    torch._check(topk_ids.shape[0] == T, lambda: "topk_ids must have one row per token of hidden_states")
    torch._check(topk_weights.shape[0] == T, lambda: "topk_weights must have one row per token of hidden_states")
    # The real op returns a fresh contiguous (T, H) tensor in hidden_states' dtype.
    return hidden_states.new_empty(T, H)


@functools.lru_cache(maxsize=None)
def _routing_spec(num_experts, top_k, scoring, renormalize, n_group, topk_group, group_score_topk,
                  routed_scaling_factor, uses_correction_bias) -> ModelSpec:
    # Only the routing fields matter to route(); the shapes H and F are placeholders. Cached: a
    # model calls with the same few routings every layer, and ModelSpec validates on creation.
    return ModelSpec(name="tritonmoe::route", hidden_size=1, intermediate_size=1, num_experts=num_experts,
                     top_k=top_k, scoring=scoring, renormalize=renormalize, n_group=n_group, topk_group=topk_group,
                     group_score_topk=group_score_topk, routed_scaling_factor=routed_scaling_factor,
                     uses_correction_bias=uses_correction_bias)


def route_by_fields(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = True,
                    n_group: int = 1, topk_group: int = 1, group_score_topk: int = 2,
                    routed_scaling_factor: float = 1.0, correction_bias: Optional[torch.Tensor] = None,
                    int64_ids: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``tritonmoe.route`` with the routing given as ``ModelSpec``'s routing fields (E is
    ``router_logits.shape[1]``; a ``correction_bias`` means ``uses_correction_bias``): (T, E) logits ->
    float32 (T, top_k) weights, int32 (int64 with ``int64_ids``) (T, top_k) expert ids. What the op
    ``torch.ops.tritonmoe.route`` runs; eager callers may call it directly (no dispatch cost)."""
    spec = _routing_spec(router_logits.shape[1], top_k, scoring, renormalize, n_group, topk_group, group_score_topk,
                         routed_scaling_factor, correction_bias is not None)
    return _route(router_logits, spec, correction_bias=correction_bias,
                  ids_dtype=torch.int64 if int64_ids else torch.int32)


@torch.library.custom_op("tritonmoe::route", mutates_args=())
def route(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = True,
          n_group: int = 1, topk_group: int = 1, group_score_topk: int = 2, routed_scaling_factor: float = 1.0,
          correction_bias: Optional[torch.Tensor] = None, int64_ids: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``route_by_fields`` as a custom op."""
    return route_by_fields(router_logits, top_k, scoring, renormalize, n_group, topk_group, group_score_topk,
                           routed_scaling_factor, correction_bias, int64_ids)


@route.register_fake
def _route_fake(router_logits, top_k, scoring="softmax", renormalize=True, n_group=1, topk_group=1,
                group_score_topk=2, routed_scaling_factor=1.0, correction_bias=None, int64_ids=False):
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must have 2 dimensions, got shape {tuple(router_logits.shape)}")
    T = router_logits.shape[0]
    return (router_logits.new_empty(T, top_k, dtype=torch.float32),
            router_logits.new_empty(T, top_k, dtype=torch.int64 if int64_ids else torch.int32))
