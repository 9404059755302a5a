"""tritonmoe as a Hugging Face transformers experts implementation ("tritonmoe").

    import tritonmoe.integrations.transformers  # registers "tritonmoe" (or call register())
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="tritonmoe")
    model.set_experts_implementation("tritonmoe")  # or switch a loaded model

transformers >= 5 stores a model's routed experts as 3-D tensors in an experts module
decorated with ``use_experts_implementation`` and looks its forward up by name in
``ExpertsInterface``; the router stays the model's own. This forward runs the experts through
``torch.ops.tritonmoe.fused_experts`` (``tritonmoe.ops``), so ``torch.compile`` keeps one graph.

Served: gated SiLU experts, gate rows then up rows (``gate_up_proj`` (E, 2F, H), ``down_proj``
(E, H, F), or both transposed), no biases: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, OLMoE,
Aria and the other families built the same way. Anything else raises NotImplementedError
naming the option (see ``unsupported``), never a silently different result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops  # noqa: F401  (registers torch.ops.tritonmoe.fused_experts; imports tritonmoe before triton)
from .._utils import SUPPORTED_DTYPES, interpreting

try:
    from transformers.activations import SiLUActivation
    from transformers.integrations import moe as _hf_moe
    from transformers.integrations.moe import ExpertsInterface
except ImportError as exc:
    raise ImportError("tritonmoe.integrations.transformers needs transformers>=5, whose "
                      "transformers.integrations.moe.ExpertsInterface dispatches experts modules: "
                      "pip install 'tritonmoe[hf]'") from exc

__all__ = ["NAME", "register", "experts_forward", "unsupported", "check_model"]

NAME = "tritonmoe"
_SILU = (nn.SiLU, SiLUActivation)
# The gate transformers applies unless a family overrides _apply_gate: act_fn(gate) * up.
_DEFAULT_GATE = getattr(_hf_moe, "_default_apply_gate", None)


def unsupported(experts: nn.Module) -> list[str]:
    """What ``experts`` (a transformers experts module) does that tritonmoe cannot compute; empty if served."""
    found = []
    if not getattr(experts, "has_gate", True):
        found.append("has_gate=False (ungated experts: act_fn(up_proj x) without a gate)")
    if getattr(experts, "has_bias", False):
        found.append("has_bias=True (gate_up_proj_bias / down_proj_bias)")
    if not getattr(experts, "is_concatenated", True):
        found.append("is_concatenated=False (interleaved gate/up: gate0, up0, gate1, ...; tritonmoe needs all gate "
                     "rows, then all up rows)")
    if getattr(experts, "has_post_expert_norm", False):
        found.append("has_post_expert_norm=True (a norm on each expert's output before weighting)")
    if getattr(experts, "_is_expert_parallel", False):
        found.append("expert parallelism (sentinel expert ids >= num_experts)")
    gate = getattr(type(experts), "_apply_gate", _DEFAULT_GATE)
    if gate is not _DEFAULT_GATE:
        found.append(f"a custom gate ({type(experts).__name__}._apply_gate; tritonmoe computes silu(gate) * up)")
    act = getattr(experts, "act_fn", None)
    if type(act) not in _SILU and act is not F.silu:
        hidden_act = getattr(getattr(experts, "config", None), "hidden_act", None)
        found.append(f"activation {type(act).__name__} (config.hidden_act={hidden_act!r}); tritonmoe computes SiLU")
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(experts, name, None)
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            found.append(f"{name} is not a 3-D tensor (got {type(w).__name__})")
        elif w.dtype not in SUPPORTED_DTYPES:
            found.append(f"{name} dtype {w.dtype} (quantized or float64 weights; supported: float16, bfloat16, "
                         "float32)")
        elif w.dtype == torch.bfloat16 and interpreting():
            found.append(f"{name} dtype torch.bfloat16 under Triton's CPU interpreter (its bfloat16 dot is wrong; "
                         "use float32 or float16 on the CPU)")
    return found


def check_experts(experts: nn.Module) -> None:
    problems = unsupported(experts)
    if problems:
        raise NotImplementedError(f"experts_implementation={NAME!r} cannot run {type(experts).__name__}: "
                                  f"unsupported {'; '.join(problems)}. Use experts_implementation='grouped_mm' "
                                  "or 'eager' for this model.")


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts of one MoE layer: (T, H) states, (T, k) expert ids and routing weights -> (T, H)."""
    check_experts(self)  # a few attribute reads: cheap per call, and compiled away by torch.compile
    w13, w2 = self.gate_up_proj, self.down_proj
    if getattr(self, "is_transposed", False):
        # stored (E, H, 2F) and (E, F, H): transposed views, as the kernels take any strides
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    T = x.shape[0]
    # Like transformers' grouped_mm: states in the weights' dtype (autocast can hand over float32),
    # the result in the states' dtype.
    out = torch.ops.tritonmoe.fused_experts(x.to(w13.dtype), w13, w2, top_k_weights.reshape(T, -1),
                                            top_k_index.reshape(T, -1))
    return out.to(hidden_states.dtype).reshape(hidden_states.shape)


def register(name: str = NAME) -> None:
    """Make ``experts_implementation=name`` (default "tritonmoe") run experts through tritonmoe.

    Done when this module is imported; registration is global to transformers (all models).
    """
    ExpertsInterface.register(name, experts_forward)


def check_model(model: nn.Module) -> int:
    """Raise now, not at the first forward, if an experts module of ``model`` set to run through
    tritonmoe has an option it cannot compute. Returns how many experts modules it will run."""
    served, problems = 0, []
    for path, module in model.named_modules():
        config = getattr(module, "config", None)
        impl = getattr(config, "_experts_implementation", None)
        # use_experts_implementation sets has_bias and is_transposed on every experts module (since 5.0)
        if not hasattr(module, "is_transposed") or ExpertsInterface().get(impl) is not experts_forward:
            continue
        served += 1
        if unsupported(module):
            problems.append(f"{path or '<model>'} ({type(module).__name__}): {'; '.join(unsupported(module))}")
    if problems:
        raise NotImplementedError(f"experts_implementation={NAME!r} cannot run: " + " | ".join(problems))
    return served


register()
