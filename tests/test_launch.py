"""tritonmoe._launch: the cached direct launch may reuse a compiled kernel only where Triton
would have specialised the arguments the same way (the key is checked here on the CPU; the
launches themselves run in every GPU test)."""
import importlib
import inspect

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from tritonmoe._launch import _signature, _takes_gdc


def _kernel(x, n, BLOCK: tl.constexpr):
    pass


KERNEL = JITFunction(_kernel)  # a Triton kernel object even under the interpreter: only its parameters are read
X = torch.zeros(64, dtype=torch.float32)


def sig(x=X, n=48, block=16):
    return _signature(KERNEL, (x, n, block))


def test_constexprs_by_value():
    assert sig(block=16) != sig(block=32) != sig(block=48)   # ints that an int rule would lump together


@pytest.mark.parametrize("a, b", [
    (1, 2),                  # Triton turns an int equal to 1 into a constant
    (16, 17), (32, 33),      # divisibility by 16
    (2**31 - 16, 2**31),     # int32 -> int64 argument
    (2**63 - 16, 2**63),     # int64 -> uint64
    (None, 0),
])
def test_runtime_ints_by_what_triton_specialises(a, b):
    assert sig(n=a) != sig(n=b)


def test_runtime_ints_of_one_class_share_a_key():
    # what varies per call without changing Triton's specialisation maps to one key (a bounded cache)
    assert sig(n=48) == sig(n=2**20) and sig(n=3) == sig(n=5)


def test_tensors_by_dtype_and_alignment():
    assert sig(X) == sig(torch.ones(8, dtype=torch.float32))
    assert sig(X) != sig(X.to(torch.float16))
    assert sig(X) != sig(X[1:])          # 4-byte offset: not 16-byte aligned
    assert sig(X) == sig(X[4:])          # 16-byte offset: aligned


def test_descriptors():
    w = torch.zeros(64, 32, dtype=torch.float16)
    d = lambda t, block: TensorDescriptor(t, list(t.shape), list(t.stride()), block)  # noqa: E731
    assert sig(d(w, [16, 16])) == sig(d(w.clone(), [16, 16])) == sig(d(w[:48], [16, 16]))
    assert sig(d(w, [16, 16])) != sig(d(w[:40], [16, 16]))  # rows no longer divisible by 16
    assert sig(d(w, [16, 16])) != sig(d(w, [32, 16]))
    assert sig(d(w, [16, 16])) != sig(d(w.to(torch.float32), [16, 16]))


def test_other_values_by_value():
    assert sig(n=True) != sig(n=False) and sig(n=1.5) != sig(n=2.5)


def test_every_forward_kernel_waits_for_its_predecessor():
    # launch() turns on programmatic dependent launch for kernels whose last parameter is USE_GDC, and each
    # such kernel must call await_previous(USE_GDC) before it reads: a kernel left out would run unordered
    # against a predecessor launched with PDL, so every kernel of the forward takes part
    # the modules (the package exports functions named route and permute)
    gemm, permute, route, router, schedule = (importlib.import_module(f"tritonmoe.{m}") for m in
                                              ("gemm", "permute", "route", "router", "schedule"))
    kernels = [router._router_kernel, router._router_mma_kernel, route._route_kernel, schedule._histogram_kernel,
               schedule._scan_kernel, schedule._scatter_kernel, schedule._schedule_one_chunk_kernel,
               gemm._expert_gemm_kernel, gemm._expert_gemm_kernel_checked, gemm._silu_mul_kernel,
               permute._permute_kernel, permute._combine_kernel]
    for k in kernels:
        assert _takes_gdc(k), k.fn.__name__
        assert "await_previous(USE_GDC)" in inspect.getsource(k.fn), k.fn.__name__
    assert not _takes_gdc(KERNEL)


class _RecordingKernel:
    """Stands in for a Triton kernel whose last parameter is USE_GDC: records how it was launched."""
    arg_names = ["x", "USE_GDC"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((args[-1], kw["launch_pdl"]))


@pytest.mark.parametrize("dependent", [True, False])
def test_launch_dependent_only_where_asked(monkeypatch, dependent):
    # on a GPU with programmatic dependent launch, launch() turns it on (USE_GDC and launch_pdl) unless the
    # caller says the kernel must not start early (a persistent grid)
    from tritonmoe import _launch
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(_launch, "_direct", False)
    monkeypatch.setattr(_launch, "_has_pdl", lambda device: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    kernel = _RecordingKernel()
    _launch.launch(kernel, (1,), (X,), dependent=dependent)
    assert kernel.calls == [(dependent, dependent)]


@pytest.mark.parametrize("persistent", [False, True])
def test_persistent_gemm_is_not_launched_early(monkeypatch, persistent, device):
    # launched early, a persistent grid ran 1.75x slower on the H100 (PERF_LOG v21): the GEMMs ask for a normal
    # launch exactly when their tiles are persistent
    import tritonmoe
    from tritonmoe import gemm
    seen = []
    real = gemm.launch
    monkeypatch.setattr(gemm, "launch", lambda *a, **kw: (seen.append(kw["dependent"]), real(*a, **kw)))
    torch.manual_seed(0)
    x, w13 = torch.randn(24, 32, device=device), torch.randn(4, 64, 32, device=device)
    ids = torch.randint(0, 4, (24, 2), dtype=torch.int32, device=device)
    tiles = tritonmoe.TileConfig(block_m=16, block_n=32, block_k=32, persistent=persistent)
    out = tritonmoe.gate_up_silu(x, w13, tritonmoe.build_schedule(ids, 4, 16), tiles)
    assert seen == [not persistent] and torch.isfinite(out).all()
