"""experts_implementation="tritonmoe" in Hugging Face transformers vs its "eager" experts.

Tiny models built from configs with random weights (no downloads). The router is the model's
own in both runs, so the first MoE layer routes bit-identical inputs; later layers see inputs
that differ by float32 rounding (~1e-7), which could flip only a near-tie: the routing of every
layer is compared exactly first, so such a flip would be reported as such, not as an error.
"""
import copy

import pytest
import torch

pytest.importorskip("transformers", minversion="5", reason="needs transformers>=5 (pip install 'tritonmoe[hf]')")

import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import tritonmoe.integrations.transformers as hf  # noqa: E402
from tritonmoe._utils import interpreting  # noqa: E402
from conftest import TOLERANCE, dtypes_for, rel_err  # noqa: E402

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, tie_word_embeddings=False,
              # larger than the default 0.02, so the experts' share of the logits is not negligible
              initializer_range=0.15)
FAMILIES = {
    "mixtral": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                      num_experts=6, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                      head_dim=16, norm_topk_prob=True),
    "deepseek_v3": dict(intermediate_size=48, moe_intermediate_size=24, n_shared_experts=1, n_routed_experts=8,
                        n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=0,
                        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=2),
    "olmoe": dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2, eos_token_id=None, pad_token_id=None),
    # transposed layout: gate_up_proj (E, H, 2F), down_proj (E, F, H)
    "aria_text": dict(intermediate_size=24, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1),
}


def tiny(family, device, dtype=torch.float32, impl="eager", **overrides):
    cfg = AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, experts_implementation=impl).to(device, dtype).eval()


def experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "is_transposed") and hasattr(m, "gate_up_proj")]


def interface_experts(model, family):
    """The model's experts modules that go through ExpertsInterface; skip (saying so) where this
    transformers version builds the family's experts otherwise (e.g. Aria before 5.23)."""
    found = experts_modules(model)
    if not found:
        pytest.skip(f"{family}: transformers {transformers.__version__} does not run its experts through "
                    "ExpertsInterface")
    return found


@torch.no_grad()
def run(model, ids):
    """Logits, and per experts call its (states, ids, weights) inputs and output."""
    calls = []

    def hook(module, args, kwargs, out):
        calls.append((*args, *kwargs.values(), out))
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in experts_modules(model)]
    try:
        return model(input_ids=ids, use_cache=False).logits, calls
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_eager(family, device):
    model = tiny(family, device)
    served = interface_experts(model, family)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    ref, ref_calls = run(model, ids)
    model.set_experts_implementation(hf.NAME)
    assert hf.check_model(model) == len(served)
    out, calls = run(model, ids)
    assert len(calls) == len(ref_calls)
    for layer, ((_, ids_t, _, y), (_, ids_r, _, y_ref)) in enumerate(zip(calls, ref_calls)):
        assert torch.equal(ids_t, ids_r), f"layer {layer}: routing flipped on a near-tie; change the seed"
        err = rel_err(y, y_ref)
        assert err <= TOLERANCE[torch.float32], f"{family} experts of MoE layer {layer}: relative error {err:.3g}"
        # the check has teeth: the experts move the residual stream by O(1) of it
        assert y_ref.norm() > 0.05 * calls[layer][0].norm()
    err = rel_err(out, ref)
    assert err <= TOLERANCE[torch.float32], f"{family} logits: relative error {err:.3g}"


@pytest.mark.parametrize("family", ["mixtral", "aria_text"])
def test_low_precision(family, device):
    """16-bit weights: each experts call against float32 eager experts on the same inputs."""
    for dtype in dtypes_for(device)[1:]:
        model = tiny(family, device, dtype, impl=hf.NAME)
        experts = interface_experts(model, family)
        logits, calls = run(model, torch.randint(0, VOCAB, (2, 9), device=device))
        assert logits.dtype == dtype and torch.isfinite(logits).all()
        assert len(calls) == len(experts)
        for module, (x, ids, w, y) in zip(experts, calls):
            assert y.dtype == dtype
            ref_module = copy.deepcopy(module).float()  # its own copy of the config too
            ref_module.config._experts_implementation = "eager"
            err = rel_err(y, ref_module(x.float(), ids, w.float()))
            assert err <= TOLERANCE[dtype], f"{family} {dtype}: relative error {err:.3g}"


def test_from_pretrained(tmp_path, device):
    tiny("mixtral", "cpu").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=hf.NAME).to(device).eval()
    assert model.config._experts_implementation == hf.NAME
    ids = torch.randint(0, VOCAB, (1, 6), device=device)
    out, _ = run(model, ids)
    model.set_experts_implementation("eager")
    ref, _ = run(model, ids)
    assert rel_err(out, ref) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("family, router", [("mixtral", False), ("mixtral", True), ("deepseek_v3", True)],
                         ids=["mixtral", "mixtral-tritonmoe_router", "deepseek_v3-tritonmoe_router"])
def test_compile_one_graph_for_all_lengths(family, router, device):
    """fullgraph: no graph break at the experts (nor at a switched router); dynamic: a new length does
    not recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = tiny(family, device, impl=hf.NAME, num_hidden_layers=1)  # one layer: half the tracing
    if router:
        assert hf.use_tritonmoe_router(model) == 1
    counter = CompileCounterWithBackend("aot_eager")  # inductor is covered on the op alone (test_ops)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for length in (5, 11):
            ids = torch.randint(0, VOCAB, (2, length), device=device)
            out = compiled(input_ids=ids, use_cache=False).logits
            assert rel_err(out, model(input_ids=ids, use_cache=False).logits) <= TOLERANCE[torch.float32]
            frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[1] == frames[0], f"compiled frames after each length: {frames}"
    targets = {node.target for gm in counter.graphs for node in gm.graph.nodes}
    assert bool(targets & {torch.ops.tritonmoe.route, torch.ops.tritonmoe.route.default}) == router


def test_unsupported_activation_raises():
    model = tiny("mixtral", "cpu", impl=hf.NAME, hidden_act="gelu")
    with pytest.raises(NotImplementedError, match=r"activation GELUActivation \(config.hidden_act='gelu'\)"):
        hf.check_model(model)
    with pytest.raises(NotImplementedError, match="activation GELUActivation"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_unsupported_family_raises():
    """gpt-oss: biases, interleaved gate/up, clamped SwiGLU gate -- all named."""
    cfg = AutoConfig.for_model("gpt_oss", **{**COMMON, "intermediate_size": 24, "num_local_experts": 4,
                                             "num_experts_per_tok": 2, "head_dim": 16})
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation=hf.NAME).eval()
    with pytest.raises(NotImplementedError) as info:
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))
    for what in ("GptOssExperts", "has_bias=True", "is_concatenated=False", "GptOssExperts._apply_gate"):
        assert what in str(info.value)


@pytest.mark.parametrize("option, value, named", [
    ("has_gate", False, "has_gate=False"),
    ("has_post_expert_norm", True, "has_post_expert_norm=True"),
    ("_is_expert_parallel", True, "expert parallelism"),
    ("dtype", torch.float64, "gate_up_proj dtype torch.float64"),
    pytest.param("dtype", torch.bfloat16, "gate_up_proj dtype torch.bfloat16 under Triton's CPU interpreter",
                 marks=pytest.mark.skipif(not interpreting(), reason="bfloat16 runs on the GPU")),
])
def test_unsupported_option_raises(option, value, named):
    model = tiny("mixtral", "cpu", impl=hf.NAME)
    experts = experts_modules(model)[0]
    if option == "dtype":
        experts.to(value)
    else:
        setattr(experts, option, value)
    x = torch.randn(3, 32, dtype=experts.gate_up_proj.dtype)
    with pytest.raises(NotImplementedError, match=named):
        experts(x, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    with pytest.raises(NotImplementedError, match=named):
        hf.check_model(model)


def test_weight_dtype_change_is_checked_again(device):
    """The eager forward checks a module once per weight dtype: a model moved to float64 after a
    first call still raises rather than running."""
    experts = experts_modules(tiny("mixtral", device, impl=hf.NAME))[0]
    ids, w = torch.zeros(3, 2, dtype=torch.long, device=device), torch.ones(3, 2, device=device)
    experts(torch.randn(3, 32, device=device), ids, w)
    experts.to(torch.float64)
    with pytest.raises(NotImplementedError, match="gate_up_proj dtype torch.float64"):
        experts(torch.randn(3, 32, dtype=torch.float64, device=device), ids, w)


def test_registered():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    assert ALL_EXPERTS_FUNCTIONS[hf.NAME] is hf.experts_forward
    hf.register("tritonmoe_alias")
    try:
        assert ALL_EXPERTS_FUNCTIONS["tritonmoe_alias"] is hf.experts_forward
    finally:
        type(ALL_EXPERTS_FUNCTIONS)._global_mapping.pop("tritonmoe_alias")


def test_cuda_graph_whole_model(device):
    """A whole transformers forward with tritonmoe experts captured in one CUDA graph: replays with
    new input ids match the same model run eagerly."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    from test_ops import _captured
    model = tiny("mixtral", device, impl=hf.NAME)
    static_ids = torch.randint(0, VOCAB, (2, 9), device=device)
    with torch.no_grad():
        graph, logits = _captured(lambda: model(input_ids=static_ids, use_cache=False).logits, device)
        for seed in (1, 2):
            new_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed)).to(device)
            static_ids.copy_(new_ids)
            graph.replay()
            ref = model(input_ids=new_ids, use_cache=False).logits
            assert rel_err(logits, ref) <= TOLERANCE[torch.float32], f"replay {seed}"


# ----------------------------------------------------------------------------------------------
# use_tritonmoe_router: the gating through torch.ops.tritonmoe.route
# ----------------------------------------------------------------------------------------------

ROUTERS = {"mixtral": "MixtralTopKRouter", "qwen2_moe": "Qwen2MoeTopKRouter", "qwen3_moe": "Qwen3MoeTopKRouter",
           "deepseek_v3": "DeepseekV3TopkRouter", "olmoe": "OlmoeTopKRouter"}


def routers(model, family):
    return [m for m in model.modules() if type(m).__name__ == ROUTERS[family]]


def spread_router(model, family, seed=0):
    """Router weights (and DeepSeek-V3's correction bias) spread wider than the init, so the experts'
    scores are well apart and the bias takes part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in routers(model, family):
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 2 / r.hidden_dim ** 0.5)
            if hasattr(r, "e_score_correction_bias"):
                r.e_score_correction_bias.copy_(torch.randn(r.num_experts, generator=g) * 0.1)


def by_expert(ids, weights):
    """Ids ascending per token, weights in the same order: DeepSeek-V3's topk(sorted=False) leaves the
    order unspecified, and the experts' weighted sum does not depend on it."""
    ids, order = ids.reshape(-1, ids.shape[-1]).sort(-1)
    return ids, weights.reshape(ids.shape).gather(-1, order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("family", list(ROUTERS))
def test_router_matches_models_own(family, dtype, device):
    from tritonmoe.reference import selection_margin
    model = tiny(family, device, dtype)
    spread_router(model, family)
    found = routers(model, family)
    assert hf.use_tritonmoe_router(model) == len(found) == COMMON["num_hidden_layers"]
    for r in found:
        x = torch.randn(37, r.hidden_dim, generator=torch.Generator().manual_seed(2)).to(device, dtype)
        logits, w, ids = r(x)
        ref_logits, ref_w, ref_ids = type(r).forward(r, x)  # the model's own
        spec = hf.router_spec(r)
        bias = getattr(r, "e_score_correction_bias", None)
        margin = selection_margin(ref_logits.cpu(), spec, correction_bias=None if bias is None else bias.cpu())
        assert (margin > 1e-5).all(), "near-tie in the inputs; change the seed"
        assert torch.equal(logits, ref_logits)
        assert (w.dtype, ids.dtype, w.shape, ids.shape) == (ref_w.dtype, ref_ids.dtype, ref_w.shape, ref_ids.shape)
        ids, w = by_expert(ids, w)
        ref_ids, ref_w = by_expert(ref_ids, ref_w)
        assert torch.equal(ids, ref_ids)
        tol = dict(rtol=1e-5, atol=1e-6) if w.dtype == torch.float32 else {}
        torch.testing.assert_close(w, ref_w, **tol)


@pytest.mark.parametrize("family", list(ROUTERS))
def test_router_whole_model_matches_eager(family, device):
    """tritonmoe experts and router against the model's own experts ("eager") and router."""
    model = tiny(family, device)
    spread_router(model, family)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    ref, ref_calls = run(model, ids)
    model.set_experts_implementation(hf.NAME)
    assert hf.use_tritonmoe_router(model) == len(routers(model, family)) == len(ref_calls)
    out, calls = run(model, ids)
    for layer, ((_, ids_t, w_t, _), (_, ids_r, w_r, _)) in enumerate(zip(calls, ref_calls)):
        (ids_t, w_t), (ids_r, w_r) = by_expert(ids_t, w_t), by_expert(ids_r, w_r)
        assert torch.equal(ids_t, ids_r), f"layer {layer}: routing flipped on a near-tie; change the seed"
        torch.testing.assert_close(w_t, w_r, rtol=1e-5, atol=1e-6)
    err = rel_err(out, ref)
    assert err <= TOLERANCE[torch.float32], f"{family} logits: relative error {err:.3g}"


def test_router_switch_back_and_copy():
    import copy
    model = tiny("mixtral", "cpu")
    assert hf.use_tritonmoe_router(model) == 2
    assert hf.use_tritonmoe_router(model) == 2  # again: idempotent
    r = routers(model, "mixtral")[0]
    clone = copy.deepcopy(model)
    assert routers(clone, "mixtral")[0].forward.__self__ is routers(clone, "mixtral")[0]  # bound to the copy
    assert hf.use_tritonmoe_router(model, enable=False) == 2
    assert "forward" not in vars(r) and hf.use_tritonmoe_router(model, enable=False) == 0


def test_router_training_runs_models_own():
    """tritonmoe's router has no backward: in training mode the model's own forward runs, gradients and all."""
    model = tiny("qwen3_moe", "cpu")
    hf.use_tritonmoe_router(model)
    r = routers(model, "qwen3_moe")[0].train()
    x = torch.randn(5, r.hidden_dim)
    _, w, _ = r(x)
    assert torch.equal(w, type(r).forward(r, x)[1])
    w.sum().backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_router_unknown_left_alone():
    """gpt-oss's router (biased logits, softmax over the top k only) and a subclass of a recognised
    router (its forward may differ) are not switched."""
    cfg = AutoConfig.for_model("gpt_oss", **{**COMMON, "intermediate_size": 24, "num_local_experts": 4,
                                             "num_experts_per_tok": 2, "head_dim": 16})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert hf.use_tritonmoe_router(model) == 0
    assert not any("forward" in vars(m) for m in model.modules())
    mixtral = tiny("mixtral", "cpu")
    r = routers(mixtral, "mixtral")[0]
    r.__class__ = type("MyRouter", (type(r),), {})
    assert hf.router_spec(r) is None and hf.use_tritonmoe_router(mixtral) == 1


def test_router_refused():
    """Settings that are no valid routing, or a forward already replaced on the instance: ValueError naming
    it, nothing switched. Float64 logits: TypeError at the forward."""
    model = tiny("deepseek_v3", "cpu")
    first, second = routers(model, "deepseek_v3")
    second.topk_group = 3
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.gate \(DeepseekV3TopkRouter\).*topk_group=3 exceeds "
                                         r"n_group=2"):
        hf.use_tritonmoe_router(model)
    assert "forward" not in vars(first)
    second.topk_group = 1
    second.forward = lambda h: None  # e.g. accelerate's offloading hooks
    with pytest.raises(ValueError, match="model.layers.1.mlp.gate.*already replaced on the instance"):
        hf.use_tritonmoe_router(model)
    model = tiny("mixtral", "cpu", torch.float64)
    hf.use_tritonmoe_router(model)
    with pytest.raises(TypeError, match="router_logits has dtype float64"):
        routers(model, "mixtral")[0](torch.randn(3, 32, dtype=torch.float64))
