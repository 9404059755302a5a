"""Routing kernel vs reference.route, for every scheme over the E x k x T grid."""
import pytest
import torch

import tritonmoe
from tritonmoe import reference
from conftest import ROUTE_MARGIN
from helpers import EK, SCHEMES, TOKENS, scheme_spec


def _inputs(spec, T, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, spec.num_experts, generator=g) * 2).to(dtype).to(device)
    bias = (torch.randn(spec.num_experts, generator=g) * 0.1).to(device) if spec.uses_correction_bias else None
    return logits, bias


def check_route(spec, logits, bias):
    w, ids = tritonmoe.route(logits, spec, correction_bias=bias)
    rw, rids = reference.route(logits.cpu(), spec, correction_bias=None if bias is None else bias.cpu())
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == ids.shape == (logits.shape[0], spec.top_k)
    w, ids = w.cpu(), ids.cpu()
    clear = reference.selection_margin(logits.cpu(), spec, correction_bias=None if bias is None else bias.cpu())
    clear = clear > ROUTE_MARGIN
    # Near-ties may go either way in float32; they must stay rare, or this test would prove little.
    assert clear.float().mean() >= 0.9 or logits.shape[0] < 10, f"too many near-ties: {(~clear).sum()}"
    assert torch.equal(ids[clear], rids[clear])
    assert torch.allclose(w[clear], rw[clear], rtol=1e-5, atol=1e-6)
    # Every token, near-tie or not: k distinct, valid experts, finite weights.
    assert ((ids >= 0) & (ids < spec.num_experts)).all()
    if spec.top_k > 1 and ids.numel():
        assert (ids.sort(1).values.diff(dim=1) > 0).all()
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("E,k", EK)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_route_matches_reference(scheme, E, k, T, device):
    spec = scheme_spec(scheme, E, k)
    check_route(spec, *_inputs(spec, T, device, seed=T * 1000 + E * 10 + k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_route_low_precision_logits(scheme, dtype, device):
    spec = scheme_spec(scheme, 64, 8)
    check_route(spec, *_inputs(spec, 33, device, dtype))


@pytest.mark.parametrize("spec", list(tritonmoe.specs.ALL_SPECS.values()), ids=lambda s: s.name)
def test_route_real_specs(spec, device):
    check_route(spec, *_inputs(spec, 40, device))


@pytest.mark.parametrize("scheme", ["mixtral", "deepseek_v3"])
def test_route_int64_ids(scheme, device):
    spec = scheme_spec(scheme, 64, 8)
    logits, bias = _inputs(spec, 40, device)
    w, ids = tritonmoe.route(logits, spec, correction_bias=bias)
    w64, ids64 = tritonmoe.route(logits, spec, correction_bias=bias, ids_dtype=torch.int64)
    assert ids64.dtype == torch.int64 and torch.equal(ids64, ids.long()) and torch.equal(w64, w)


def test_route_non_contiguous_logits(device):
    spec = scheme_spec("deepseek_v3", 64, 8)
    logits, bias = _inputs(spec, 50, device)
    check_route(spec, logits.T.contiguous().T, bias)       # column-major
    check_route(spec, torch.cat([logits, logits], 1)[:, ::2], bias)  # strided columns


@pytest.mark.parametrize("scheme", SCHEMES)
def test_exact_ties_go_to_lowest_id(scheme, device):
    spec = scheme_spec(scheme, 64, 8)
    logits = torch.zeros(5, 64, device=device)
    bias = torch.zeros(64, device=device) if spec.uses_correction_bias else None
    w, ids = tritonmoe.route(logits, spec, correction_bias=bias)
    # all equal: groups 0..3 kept (ties to the lowest group), then experts 0..7
    assert ids.cpu().tolist() == [list(range(8))] * 5
    rw, rids = reference.route(logits.cpu(), spec, correction_bias=None if bias is None else bias.cpu())
    assert torch.equal(ids.cpu(), rids) and torch.allclose(w.cpu(), rw)


# Group-limited routing both ways the kernel computes it: groups tiling a power-of-two row (all groups'
# scores at once, kept groups by rank) and any other layout (a loop over groups), with 1 or 2 scores per
# group, including NaN logits (never selected; the token's weights NaN).
@pytest.mark.parametrize("E,n_group,topk_group,k,score_topk", [
    (32, 4, 2, 4, 2), (256, 8, 4, 8, 2), (64, 8, 3, 6, 1),     # groups tile the row
    (12, 4, 2, 3, 2), (24, 3, 2, 4, 2), (40, 5, 2, 8, 1),      # they do not
])
def test_group_limited_layouts(E, n_group, topk_group, k, score_topk, device):
    spec = scheme_spec("deepseek_v3", E, k).replace(n_group=n_group, topk_group=topk_group,
                                                    group_score_topk=score_topk)
    logits, bias = _inputs(spec, 50, device, seed=E + k)
    check_route(spec, logits, bias)
    logits[3, 1] = float("nan")
    w, ids = tritonmoe.route(logits, spec, correction_bias=bias)
    rw, rids = reference.route(logits.cpu(), spec, correction_bias=bias.cpu())
    assert ((ids >= 0) & (ids < E)).all() and not (ids[3] == 1).any()
    assert torch.equal(torch.isnan(w.cpu()), torch.isnan(rw)) and torch.equal(ids[3].cpu(), rids[3])


def test_non_finite_logits(device):
    spec = scheme_spec("mixtral", 8, 2)
    logits = torch.randn(4, 8, device=device)
    logits[0, 3] = float("nan")
    logits[1, :6] = float("-inf")          # -inf is probability 0: experts 6, 7 win
    logits[2, 5] = float("inf")            # +inf under softmax: NaN weights
    w, ids = tritonmoe.route(logits, spec)
    w, ids = w.cpu(), ids.cpu()
    assert ((ids >= 0) & (ids < 8)).all()
    assert torch.isnan(w[0]).all() and torch.isnan(w[2]).all()
    assert sorted(ids[1].tolist()) == [6, 7] and torch.isfinite(w[1]).all()
    assert torch.isfinite(w[3]).all()
    rw, rids = reference.route(logits.cpu(), spec)
    assert torch.equal(ids[1], rids[1]) and torch.equal(ids[3], rids[3])


def test_route_empty(device):
    spec = scheme_spec("mixtral", 8, 2)
    w, ids = tritonmoe.route(torch.empty(0, 8, device=device), spec)
    assert w.shape == ids.shape == (0, 2)


@pytest.mark.parametrize("call, error, match", [
    (lambda d: tritonmoe.route(torch.randn(8, device=d), scheme_spec("mixtral", 8, 2)), ValueError, "router_logits"),
    (lambda d: tritonmoe.route(torch.randn(3, 9, device=d), scheme_spec("mixtral", 8, 2)), ValueError,
     "num_experts"),
    (lambda d: tritonmoe.route(torch.randint(0, 3, (3, 8), device=d), scheme_spec("mixtral", 8, 2)), TypeError,
     "router_logits"),
    (lambda d: tritonmoe.route(torch.randn(3, 8, device=d), "mixtral"), TypeError, "spec"),
    (lambda d: tritonmoe.route(torch.randn(3, 64, device=d), scheme_spec("deepseek_v3", 64, 8)), ValueError,
     "correction_bias"),
    (lambda d: tritonmoe.route(torch.randn(3, 64, device=d), scheme_spec("deepseek_v3", 64, 8),
                               correction_bias=torch.zeros(63, device=d)), ValueError, "correction_bias"),
    (lambda d: tritonmoe.route(torch.randn(3, 8, device=d), scheme_spec("mixtral", 8, 2),
                               correction_bias=torch.zeros(8, device=d)), ValueError, "correction_bias"),
    (lambda d: tritonmoe.route(torch.randn(3, 8, device=d), scheme_spec("mixtral", 8, 2), ids_dtype=torch.int16),
     TypeError, "ids_dtype"),
])
def test_route_bad_input(call, error, match, device):
    with pytest.raises(error, match=match):
        call(device)
