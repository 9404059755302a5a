"""MoELayer (router + routed experts + shared expert) vs reference.moe_layer, for every model."""
import pytest
import torch

import tritonmoe
from tritonmoe import reference
from conftest import ROUTE_MARGIN, TOLERANCE, dtypes_for, rel_err


def small(spec):
    """The model's routing (E, k, groups, scoring) at small H and F, odd sizes."""
    return spec.replace(hidden_size=56, intermediate_size=40,
                        shared_intermediate_size=72 if spec.has_shared_expert else 0)


def check_layer(layer, x):
    out = layer(x)
    ref = reference.moe_layer(layer.cpu() if x.device.type == "cpu" else _cpu_copy(layer), x.cpu())
    assert out.shape == x.shape and out.dtype == x.dtype
    # Compare only tokens whose routing is not a float32 near-tie (see conftest.ROUTE_MARGIN).
    x2 = x.reshape(-1, x.shape[-1])
    spec = layer.spec
    bias = layer.e_score_correction_bias
    margin = reference.selection_margin(layer.router_logits(x2).cpu(), spec,
                                        correction_bias=None if bias is None else bias.cpu())
    clear = margin > ROUTE_MARGIN
    assert clear.float().mean() >= 0.9
    err = rel_err(out.reshape(-1, x.shape[-1])[clear.to(out.device)], ref.reshape(-1, x.shape[-1])[clear])
    assert err <= TOLERANCE[x.dtype], f"{spec.name}: relative error {err:.3g}"


def _cpu_copy(layer):
    copy = tritonmoe.MoELayer(layer.spec, dtype=layer.w13.dtype, device="cpu")
    copy.load_state_dict({k: v.cpu() for k, v in layer.state_dict().items()})
    return copy


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("spec", list(tritonmoe.specs.ALL_SPECS.values()), ids=lambda s: s.name)
def test_layer_matches_reference(spec, fused, device, poison):
    torch.manual_seed(0)
    for dtype in dtypes_for(device):
        layer = tritonmoe.MoELayer(small(spec), dtype=dtype, device=device, fused=fused)
        check_layer(layer, torch.randn(2, 13, spec.replace(hidden_size=56).hidden_size, device=device).to(dtype))


def test_layer_input_shapes(device):
    layer = tritonmoe.MoELayer(small(tritonmoe.specs.MIXTRAL_8X7B), dtype=torch.float32, device=device)
    check_layer(layer, torch.randn(56, device=device).view(1, 56))
    assert layer(torch.randn(3, 0, 56, device=device)).shape == (3, 0, 56)
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(3, 55, device=device))


def test_layer_rejects_non_spec():
    with pytest.raises(TypeError, match="spec"):
        tritonmoe.MoELayer("mixtral")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="full-size weights need a GPU")
@pytest.mark.parametrize("name", ["mixtral_8x7b", "qwen2_57b_a14b", "deepseek_v3"])
def test_full_size_models_bf16(name, device):
    # Real shapes: DeepSeek-V3's w13 has 7.5e9 elements, so expert 255's offset overflows int32.
    if device.type != "cuda":
        pytest.skip("GPU only")
    spec = tritonmoe.specs.get_spec(name)
    torch.manual_seed(0)
    layer = tritonmoe.MoELayer(spec, dtype=torch.bfloat16, device=device)
    x = torch.randn(5, spec.hidden_size, device=device, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(spec.num_experts)[: spec.top_k] for _ in range(5)]).int()
    ids[0, 0] = spec.num_experts - 1  # the last expert: the largest weight offsets
    ids = ids.to(device)
    weights = torch.rand(5, spec.top_k, device=device)
    out = tritonmoe.fused_experts(x, layer.w13, layer.w2, weights, ids)
    ref = reference.fused_experts(x, layer.w13, layer.w2, weights, ids)
    assert rel_err(out, ref) <= TOLERANCE[torch.bfloat16]
    del layer
    torch.cuda.empty_cache()
