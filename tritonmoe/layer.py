"""``MoELayer``: the nn.Module a model uses -- router, routed experts, optional shared expert."""
from __future__ import annotations

import math

import torch
from torch import nn

from .functional import fused_experts
from .route import route
from .router import router_logits
from .specs import ModelSpec

__all__ = ["MoELayer"]


class MoELayer(nn.Module):
    """One MoE layer of ``spec``'s model, computed by tritonmoe's kernels.

    Parameters (names follow the tensors' roles; layouts follow Hugging Face transformers):
        router_weight (E, H); e_score_correction_bias (E,) float32 buffer when the spec uses one;
        w13 (E, 2F, H) gate rows then up rows; w2 (E, H, F);
        shared_w13 (1, 2Fs, H), shared_w2 (1, H, Fs) with a shared expert;
        shared_gate_weight (1, H) with a sigmoid-gated shared expert (Qwen2-MoE).
    ``forward`` takes (..., H) and returns (..., H) in the input's dtype.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype | None = None, device=None, fused: bool = True):
        super().__init__()
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"spec must be a tritonmoe.ModelSpec, got {type(spec).__name__}")
        self.spec, self.fused = spec, fused
        self._make_parameters(spec.num_experts, dtype, device)
        self.reset_parameters()

    def _make_parameters(self, local_experts: int, dtype, device):
        """The parameters (uninitialised), with ``local_experts`` routed experts held here."""
        spec = self.spec
        E, H, F = spec.num_experts, spec.hidden_size, spec.intermediate_size
        kw = dict(dtype=dtype, device=device)
        self.router_weight = nn.Parameter(torch.empty(E, H, **kw))
        if spec.uses_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.empty(E, dtype=torch.float32, device=device))
        else:
            self.e_score_correction_bias = None
        self.w13 = nn.Parameter(torch.empty(local_experts, 2 * F, H, **kw))
        self.w2 = nn.Parameter(torch.empty(local_experts, H, F, **kw))
        if spec.has_shared_expert:
            Fs = spec.shared_intermediate_size
            self.shared_w13 = nn.Parameter(torch.empty(1, 2 * Fs, H, **kw))
            self.shared_w2 = nn.Parameter(torch.empty(1, H, Fs, **kw))
        self.shared_gate_weight = nn.Parameter(torch.empty(1, H, **kw)) if spec.shared_expert_gate else None

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Random weights scaled so activations stay O(1) (for tests and benchmarks)."""
        H, F = self.spec.hidden_size, self.spec.intermediate_size
        self.router_weight.normal_(0, 1 / math.sqrt(H), generator=generator)
        self.w13.normal_(0, 1 / math.sqrt(H), generator=generator)
        self.w2.normal_(0, 1 / math.sqrt(F), generator=generator)
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.normal_(0, 0.05, generator=generator)
        if self.spec.has_shared_expert:
            self.shared_w13.normal_(0, 1 / math.sqrt(H), generator=generator)
            self.shared_w2.normal_(0, 1 / math.sqrt(self.spec.shared_intermediate_size), generator=generator)
        if self.shared_gate_weight is not None:
            self.shared_gate_weight.normal_(0, 1 / math.sqrt(H), generator=generator)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(T, H) -> (T, E), in float32 where the model computes its router in float32 (DeepSeek-V3)."""
        return router_logits(x, self.router_weight, float32=self.spec.router_fp32)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        H = self.spec.hidden_size
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != H:
            raise ValueError(f"hidden_states must have shape (..., {H}), got {tuple(hidden_states.shape)}")
        x = hidden_states.reshape(-1, H)
        weights, ids = route(self.router_logits(x), self.spec, correction_bias=self.e_score_correction_bias)
        out = fused_experts(x, self.w13, self.w2, weights, ids, fused=self.fused)
        if self.spec.has_shared_expert:
            out = out + self.shared_expert(x)
        return out.reshape(hidden_states.shape)

    def shared_expert(self, x: torch.Tensor) -> torch.Tensor:
        """(T, H) -> (T, H): the shared expert, one more expert every token visits, with weight 1
        or its sigmoid gate (Qwen2-MoE)."""
        if self.shared_gate_weight is not None:
            gate = torch.sigmoid((x @ self.shared_gate_weight.T).float())
        else:
            gate = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        zeros = torch.zeros(x.shape[0], 1, dtype=torch.int32, device=x.device)
        return fused_experts(x, self.shared_w13, self.shared_w2, gate, zeros, fused=self.fused)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{s.name}: H={s.hidden_size}, F={s.intermediate_size}, E={s.num_experts}, k={s.top_k}, "
                f"shared={s.shared_intermediate_size}, fused={self.fused}")
