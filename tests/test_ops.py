"""torch.ops.tritonmoe.fused_experts and torch.ops.tritonmoe.route: same results as tritonmoe.fused_experts
and tritonmoe.route, sound custom ops (opcheck), and one torch.compile graph (fullgraph) for every token count."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import tritonmoe
import tritonmoe.ops  # noqa: F401  (registers the op)
from conftest import assert_close, dtypes_for, random_topk_ids

H, F, E, K = 32, 24, 4, 2
op = torch.ops.tritonmoe.fused_experts


def weights(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, 2 * F, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, F, generator=g) / F ** 0.5
    return w13.to(device, dtype), w2.to(device, dtype)


def tokens(T, device, dtype=torch.float32, ids_dtype=torch.int32):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    return x, torch.rand(T, K, generator=g).to(device), random_topk_ids(T, K, E, device, g).to(ids_dtype)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_op_matches_functional(fused, device):
    for dtype in dtypes_for(device):
        w13, w2 = weights(device, dtype)
        for T in (0, 5):
            x, w, ids = tokens(T, device, dtype)
            out = op(x, w13, w2, w, ids, fused)
            assert out.shape == (T, H) and out.dtype == dtype
            torch.testing.assert_close(out, tritonmoe.fused_experts(x, w13, w2, w, ids, fused=fused))


def test_opcheck(device):
    """Schema (no mutation, no aliasing), fake tensor vs real output, autograd registration, AOT dispatch
    with dynamic shapes -- on a plain, a non-contiguous (strided states, int64 ids) and an empty sample."""
    w13, w2 = weights(device)
    x, w, ids = tokens(6, device, ids_dtype=torch.int64)
    samples = [tokens(5, device), (torch.randn(6, 2 * H, device=device)[:, ::2], w, ids), tokens(0, device)]
    for x, w, ids in samples:
        torch.library.opcheck(op, (x, w13, w2, w, ids))


def _inductor_available():
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
        return True
    except Exception:  # noqa: BLE001 -- any failure to find a C++ compiler means no CPU inductor
        return False


# torch 2.13's inductor calls its own deprecated torch.jit.script_method while compiling
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method:DeprecationWarning")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_dynamic_tokens(backend, device):
    """One graph around the op (fullgraph) and no recompile for a new token count (dynamic T)."""
    if backend == "inductor" and device.type == "cpu" and not _inductor_available():
        pytest.skip("inductor on the CPU needs a C++ compiler")
    torch._dynamo.reset()
    w13, w2 = weights(device)

    def moe(x, w13, w2, w, ids):  # ops around the custom op, so inductor has something to fuse
        return op(x * 2, w13, w2, w.softmax(-1), ids) + x

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(moe, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for T in (3, 7):
            args = (tokens(T, device)[0], w13, w2, *tokens(T, device)[1:])
            torch.testing.assert_close(compiled(*args), moe(*args))
            frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[1] == frames[0], f"compiled frames after each token count: {frames}"


def test_compile_default_dynamic(device):
    """Default torch.compile: the second token count recompiles once as dynamic, later ones reuse it."""
    torch._dynamo.reset()
    w13, w2 = weights(device)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x, w, ids: op(x, w13, w2, w, ids), fullgraph=True, backend=counter)
    frames = []
    for T in (3, 5, 9):
        compiled(*tokens(T, device))
        frames.append(counter.frame_count)
    assert frames[2] == frames[1], f"compiled frames after each token count: {frames}"


def test_fake_checks_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, w, ids = torch.empty(5, H), torch.empty(5, K), torch.empty(5, K, dtype=torch.int32)
        assert op(x, torch.empty(E, 2 * F, H), torch.empty(E, H, F), w, ids).shape == (5, H)
        with pytest.raises(ValueError, match=r"w2 \(4, 32, 23\)"):
            op(x, torch.empty(E, 2 * F, H), torch.empty(E, H, F - 1), w, ids)
        with pytest.raises(ValueError, match="topk_ids must have 2 dimensions"):
            op(x, torch.empty(E, 2 * F, H), torch.empty(E, H, F), w, ids[:, 0])


def test_backward_is_refused(device):
    """Inference only: a forward with grad-requiring weights runs; asking for the backward raises."""
    w13, w2 = weights(device)
    x, w, ids = tokens(3, device)
    out = op(x, w13.requires_grad_(), w2, w, ids)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


def test_bfloat16_refused_by_interpreter():
    if not tritonmoe._utils.interpreting():
        pytest.skip("bfloat16 runs on the GPU")
    w13, w2 = weights("cpu", torch.bfloat16)
    x, w, ids = tokens(3, "cpu", torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16, which Triton's CPU interpreter multiplies wrongly"):
        op(x, w13, w2, w, ids)


def _captured(fn, device):
    """fn captured in a CUDA graph (after warm-up on a side stream, as torch.cuda.graphs asks)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_cuda_graph_replay(fused, device):
    """The whole experts forward (schedule built on the GPU, no host sync) in one CUDA graph; replays
    with new tokens and a new routing written into the captured inputs match the reference."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device (the CPU run covers the same code eagerly)")
    from tritonmoe import reference
    for dtype in dtypes_for(device):
        w13, w2 = weights(device, dtype)
        x, w, ids = tokens(48, device, dtype)
        graph, out = _captured(lambda: op(x, w13, w2, w, ids, fused), device)
        for seed in (1, 2):
            new_x, new_w, new_ids = tokens(48 + seed, device, dtype)
            x.copy_(new_x[:48]); w.copy_(new_w[:48]); ids.copy_(new_ids[:48])
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize(device)
            ref = reference.fused_experts(x.cpu(), w13.cpu(), w2.cpu(), w.cpu(), ids.cpu())
            assert_close(out, ref, dtype, f"replay {seed}")


# ----------------------------------------------------------------------------------------------
# torch.ops.tritonmoe.route
# ----------------------------------------------------------------------------------------------

route_op = torch.ops.tritonmoe.route
ROUTE_FIELDS = ("top_k", "scoring", "renormalize", "n_group", "topk_group", "group_score_topk", "routed_scaling_factor")


def route_args(scheme, T, device, dtype=torch.float32, E=16, k=4):
    """Logits, the op's routing arguments and correction bias for ``scheme`` at (E, k)."""
    from helpers import scheme_spec
    spec = scheme_spec(scheme, E, k)
    g = torch.Generator().manual_seed(T)
    logits = (torch.randn(T, E, generator=g) * 2).to(device, dtype)
    bias = (torch.randn(E, generator=g) * 0.1).to(device) if spec.uses_correction_bias else None
    return spec, logits, {f: getattr(spec, f) for f in ROUTE_FIELDS}, bias


@pytest.mark.parametrize("scheme", ["mixtral", "qwen2", "deepseek_v3"])
def test_route_op_matches_functional(scheme, device):
    for dtype in dtypes_for(device):
        for T in (0, 5):
            spec, logits, fields, bias = route_args(scheme, T, device, dtype)
            w, ids = route_op(logits, **fields, correction_bias=bias)
            assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == (T, spec.top_k)
            ref_w, ref_ids = tritonmoe.route(logits, spec, correction_bias=bias)
            assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w)
            w64, ids64 = route_op(logits, **fields, correction_bias=bias, int64_ids=True)
            assert ids64.dtype == torch.int64 and torch.equal(ids64, ref_ids.long()) and torch.equal(w64, ref_w)


def test_route_opcheck(device):
    """Plain, grouped with a correction bias, non-contiguous logits, no tokens."""
    samples = (("mixtral", 5, False), ("deepseek_v3", 6, False), ("qwen2", 6, True), ("mixtral", 0, False))
    for scheme, T, strided in samples:
        _, logits, fields, bias = route_args(scheme, T, device)
        if strided:
            logits = torch.randn(2 * logits.shape[1], T, device=device)[::2].t()
        torch.library.opcheck(route_op, (logits, fields.pop("top_k")), {**fields, "correction_bias": bias})


def test_route_op_refuses_invalid_routing(device):
    _, logits, fields, bias = route_args("deepseek_v3", 3, device)
    with pytest.raises(ValueError, match="topk_group=9 exceeds n_group"):
        route_op(logits, **{**fields, "topk_group": 9}, correction_bias=bias)
    with pytest.raises(ValueError, match="scoring must be one of"):
        route_op(logits, **{**fields, "scoring": "relu"}, correction_bias=bias)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method:DeprecationWarning")
def test_route_compile_fullgraph_dynamic_tokens(backend, device):
    """Router logits, the route op and the experts op in one graph, no recompile for a new token count."""
    if backend == "inductor" and device.type == "cpu" and not _inductor_available():
        pytest.skip("inductor on the CPU needs a C++ compiler")
    torch._dynamo.reset()
    w13, w2 = weights(device)
    gate = torch.randn(E, H, generator=torch.Generator().manual_seed(3)).to(device)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(4)).to(device) * 0.1

    def moe(x):
        w, ids = route_op(x @ gate.t(), K, "sigmoid", True, 2, 1, 2, 2.5, bias)
        return op(x, w13, w2, w, ids.long())

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(moe, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for T in (3, 7):
            x = tokens(T, device)[0]
            torch.testing.assert_close(compiled(x), moe(x))
            frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[1] == frames[0], f"compiled frames after each token count: {frames}"


def test_route_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        w, ids = route_op(torch.empty(5, E), K)
        assert (w.shape, w.dtype, ids.shape, ids.dtype) == ((5, K), torch.float32, (5, K), torch.int32)
        with pytest.raises(ValueError, match="router_logits must have 2 dimensions"):
            route_op(torch.empty(5), K)
