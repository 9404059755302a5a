"""tritonmoe as a Hugging Face transformers experts implementation ("tritonmoe").

    import tritonmoe.integrations.transformers  # registers "tritonmoe" (or call register())
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="tritonmoe")
    model.set_experts_implementation("tritonmoe")  # or switch a loaded model

transformers >= 5 stores a model's routed experts as 3-D tensors in an experts module
decorated with ``use_experts_implementation`` and looks its forward up by name in
``ExpertsInterface``. This forward runs the experts through ``torch.ops.tritonmoe.fused_experts``
(``tritonmoe.ops``), so ``torch.compile`` keeps one graph. The router stays the model's own unless
``use_tritonmoe_router(model)`` switches it to ``torch.ops.tritonmoe.route`` (opt-in; see there).

Served: gated SiLU experts, gate rows then up rows (``gate_up_proj`` (E, 2F, H), ``down_proj``
(E, H, F), or both transposed), no biases: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, OLMoE,
Aria and the other families built the same way. Anything else raises NotImplementedError
naming the option (see ``unsupported``), never a silently different result.
"""
from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops  # registers torch.ops.tritonmoe.*; imports tritonmoe before triton
from ..functional import fused_experts
from .._utils import SUPPORTED_DTYPES, interpreting
from ..specs import ModelSpec

try:
    from transformers.activations import SiLUActivation
    from transformers.integrations import moe as _hf_moe
    from transformers.integrations.moe import ExpertsInterface
except ImportError as exc:
    raise ImportError("tritonmoe.integrations.transformers needs transformers>=5, whose "
                      "transformers.integrations.moe.ExpertsInterface dispatches experts modules: "
                      "pip install 'tritonmoe[hf]'") from exc

__all__ = ["NAME", "register", "experts_forward", "unsupported", "check_model", "use_tritonmoe_router",
           "router_spec"]

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
    compiling = torch.compiler.is_compiling()
    w13, w2 = self.gate_up_proj, self.down_proj
    # The options checked are set when the module is built; only the weights' dtype can change
    # (model.to). So in eager, once per module and dtype (the check costs ~10 us of host time per
    # call); under torch.compile the check is traced once and costs nothing per call.
    if compiling or self.__dict__.get("_tritonmoe_checked") != (w13.dtype, w2.dtype):
        check_experts(self)
        if not compiling:
            self.__dict__["_tritonmoe_checked"] = (w13.dtype, w2.dtype)
    if getattr(self, "is_transposed", False):
        # stored (E, H, 2F) and (E, F, H): transposed views, as the kernels take any strides
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    T = x.shape[0]
    # Like transformers' grouped_mm: states in the weights' dtype (autocast can hand over float32),
    # the result in the states' dtype. The custom op keeps torch.compile's graph whole; eager calls
    # skip its dispatch (host time: experiments/host_overhead.py).
    op = torch.ops.tritonmoe.fused_experts if compiling else fused_experts
    out = op(x.to(w13.dtype), w13, w2, top_k_weights.reshape(T, -1), top_k_index.reshape(T, -1))
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


# ----------------------------------------------------------------------------------------------
# The router (opt-in): use_tritonmoe_router
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _RouterKind:
    routing: Callable[[nn.Module], dict]  # the router's attributes as ModelSpec routing fields
    float32_logits: bool = False   # F.linear on float32 states and weight (DeepSeek-V3)
    float32_weights: bool = False  # weights returned in float32 (Mixtral); else in the logits' dtype
    correction_bias: bool = False  # selection on scores + router.e_score_correction_bias


def _softmax(r: nn.Module) -> dict:
    # Mixtral always renormalises (it has no norm_topk_prob); Qwen2/3-MoE and OLMoE iff norm_topk_prob
    return dict(top_k=r.top_k, scoring="softmax", renormalize=bool(getattr(r, "norm_topk_prob", True)))


def _deepseek_v3(r: nn.Module) -> dict:
    # group score = sum of each group's top 2: transformers hard-codes .topk(2) there
    return dict(top_k=r.top_k, scoring="sigmoid", renormalize=bool(r.norm_topk_prob), n_group=r.num_group,
                topk_group=r.topk_group, group_score_topk=2, routed_scaling_factor=float(r.routed_scaling_factor))


_ROUTER_CLASSES = {  # (module under transformers.models, class): how it routes, read from its source
    ("mixtral", "MixtralTopKRouter"): _RouterKind(_softmax, float32_weights=True),
    ("qwen2_moe", "Qwen2MoeTopKRouter"): _RouterKind(_softmax),
    ("qwen3_moe", "Qwen3MoeTopKRouter"): _RouterKind(_softmax),
    ("olmoe", "OlmoeTopKRouter"): _RouterKind(_softmax),
    ("deepseek_v3", "DeepseekV3TopkRouter"): _RouterKind(_deepseek_v3, float32_logits=True, correction_bias=True),
}
_ROUTERS: dict[type, _RouterKind] = {}  # filled on first use: importing five modeling files costs time


def _known_routers() -> dict[type, _RouterKind]:
    if not _ROUTERS:
        for (family, name), kind in _ROUTER_CLASSES.items():
            try:
                module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
            except ImportError:
                continue
            if hasattr(module, name):
                _ROUTERS[getattr(module, name)] = kind
    return _ROUTERS


def router_spec(router: nn.Module) -> ModelSpec | None:
    """The routing of a transformers router module as a ``ModelSpec`` (routing fields; H is the router's,
    F a placeholder), or None if tritonmoe does not recognise its class. Raises ValueError naming the
    field where the router's settings are not a valid routing."""
    kind = _known_routers().get(type(router))
    if kind is None:
        return None
    return ModelSpec(name=type(router).__name__, hidden_size=router.hidden_dim, intermediate_size=1,
                     num_experts=router.num_experts, uses_correction_bias=kind.correction_bias,
                     router_fp32=kind.float32_logits, **kind.routing(router))


def _router_forward(self: nn.Module, hidden_states: torch.Tensor):
    """A recognised router's forward, switched by use_tritonmoe_router: the model's own logits, then
    torch.ops.tritonmoe.route under torch.compile, the function behind it (ops.route_by_fields) in
    eager; returns (logits, weights, int64 ids) in the dtypes the model's returns."""
    if self.training:  # tritonmoe's router has no backward: training keeps the model's own routing
        return type(self).forward(self, hidden_states)
    kind = _ROUTERS[type(self)]
    x, w = hidden_states.reshape(-1, self.hidden_dim), self.weight
    if kind.float32_logits:
        x, w = x.float(), w.float()
    logits = F.linear(x, w)
    bias = self.e_score_correction_bias if kind.correction_bias else None
    op = torch.ops.tritonmoe.route if torch.compiler.is_compiling() else ops.route_by_fields  # as experts_forward
    weights, ids = op(logits, **kind.routing(self), correction_bias=bias, int64_ids=True)
    return logits, weights if kind.float32_weights else weights.to(logits.dtype), ids


def use_tritonmoe_router(model: nn.Module, enable: bool = True) -> int:
    """Route the gating of ``model``'s MoE layers through tritonmoe's one-launch router (opt-in).

    Every router module whose class tritonmoe recognises gets an instance-level ``forward`` that
    computes the router logits as the model does (same linear, same dtypes) and then selects and
    weights the experts with ``torch.ops.tritonmoe.route`` (a custom op: ``torch.compile`` keeps one
    graph; eager calls skip its dispatch), returning what the model's forward returns: (logits, top-k weights, int64 top-k ids).
    ``enable=False`` switches them back. Returns how many routers were switched (or switched back).

    Recognised (as written in transformers 5.23), with the routing each maps to:

    - ``MixtralTopKRouter``: softmax, top-k, renormalised; weights float32.
    - ``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter``, ``OlmoeTopKRouter``: softmax, top-k,
      renormalised iff ``norm_topk_prob``; weights in the logits' dtype.
    - ``DeepseekV3TopkRouter``: float32 logits, sigmoid, selection on scores +
      ``e_score_correction_bias`` within the ``topk_group`` of ``n_group`` groups (group score: sum of
      its top 2), renormalised iff ``norm_topk_prob``, times ``routed_scaling_factor``.

    Same expert ids, weights within float32 rounding, except: exact ties go to the lowest expert id
    (``torch.topk`` leaves their order unspecified); ids come largest first, where DeepSeek-V3's
    ``topk(sorted=False)`` leaves the order unspecified (the experts' sum does not depend on it); and
    DeepSeek-V3 adds 1e-20 to the renormalising sum, which changes the weights only where a token's
    chosen sigmoid scores sum below ~1e-13 (every chosen logit below about -29; all of them below
    -88 gives NaN weights here, about 0 there). Mixtral's ``router_jitter_noise`` is applied by its MoE block
    to the router's input, so it reaches both alike.

    Left alone (not counted): router classes not listed above, subclasses included (their forward may
    differ) -- e.g. gpt-oss's, which biases the logits and takes the softmax over the top k only.
    In training mode (``module.training``) a switched router runs the model's own forward, since
    tritonmoe's router has no backward. Raises ValueError, switching nothing, where a recognised
    router's settings are not a valid routing (naming the field) or its ``forward`` is already replaced
    on the instance (e.g. by accelerate's offloading hooks). Router logits outside float16, bfloat16
    and float32 (a float64 model) raise TypeError at the forward.
    """
    routers = [(path, m) for path, m in model.named_modules() if type(m) in _known_routers()]
    if not enable:
        switched = [m for _, m in routers if getattr(vars(m).get("forward"), "__func__", None) is _router_forward]
        for m in switched:
            del m.forward
        return len(switched)
    for path, m in routers:  # check all before switching any
        own = vars(m).get("forward")
        if own is not None and getattr(own, "__func__", None) is not _router_forward:
            raise ValueError(f"{path} ({type(m).__name__}): its forward is already replaced on the instance "
                             f"({own!r}); tritonmoe does not stack on it")
        try:
            router_spec(m)
        except ValueError as exc:
            raise ValueError(f"{path} ({type(m).__name__}) cannot route through tritonmoe: {exc}") from exc
    for _, m in routers:
        m.forward = types.MethodType(_router_forward, m)
    return len(routers)


register()
