"""tritonmoe's forward as a PyTorch custom operator: ``torch.ops.tritonmoe.fused_experts``.

``torch.compile`` sees the op as one opaque node, so a compiled model keeps a single graph
around the Triton launches (on the CPU the interpreter runs inside the op at run time), and
the fake (meta) implementation derives the output from the inputs' symbolic shapes, so the
token count T stays dynamic: one compiled graph serves every batch size.

    out = torch.ops.tritonmoe.fused_experts(x, w13, w2, topk_weights, topk_ids)

Inference only: no backward is registered (autograd raises if one is asked for).
"""
from __future__ import annotations

import torch

from .functional import fused_experts as _fused_experts

__all__ = ["fused_experts"]


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
