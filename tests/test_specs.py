import pytest

from tritonmoe import specs


def test_published_shapes():
    # Values from each model's released config.json.
    m, q, d = specs.MIXTRAL_8X7B, specs.QWEN2_57B_A14B, specs.DEEPSEEK_V3
    assert (m.hidden_size, m.intermediate_size, m.num_experts, m.top_k, m.renormalize) == (4096, 14336, 8, 2, True)
    assert (q.hidden_size, q.intermediate_size, q.num_experts, q.top_k, q.renormalize) == (3584, 2560, 64, 8, False)
    assert (q.shared_intermediate_size, q.shared_expert_gate) == (20480, True)
    assert (d.hidden_size, d.intermediate_size, d.num_experts, d.top_k) == (7168, 2048, 256, 8)
    assert (d.scoring, d.n_group, d.topk_group, d.routed_scaling_factor) == ("sigmoid", 8, 4, 2.5)
    assert d.uses_correction_bias and d.shared_intermediate_size == 2048
    assert len(specs.ALL_SPECS) >= 5
    assert specs.get_spec("deepseek_v3") is d


@pytest.mark.parametrize("changes, field", [
    (dict(top_k=0), "top_k"),
    (dict(top_k=300), "top_k"),
    (dict(num_experts=250), "n_group"),
    (dict(topk_group=9), "topk_group"),
    (dict(scoring="relu"), "scoring"),
    (dict(hidden_size=-1), "hidden_size"),
    (dict(topk_group=1, top_k=40), "top_k"),  # one kept group of 32 cannot supply 40 experts
])
def test_invalid_specs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        specs.DEEPSEEK_V3.replace(**changes)


def test_unknown_spec():
    with pytest.raises(ValueError, match="unknown model"):
        specs.get_spec("gpt5")
