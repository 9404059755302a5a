"""Shared fixtures: the device under test, dtypes and tolerances, poisoned allocations.

The same suite runs on the CPU (Triton interpreter, CI) and on a CUDA GPU: ``--device``
picks one (default: cuda when visible, else cpu).
"""
from __future__ import annotations

import pytest
import torch

import tritonmoe  # noqa: F401  (sets TRITON_INTERPRET=1 when no GPU is visible)

# One tolerance per dtype for ||out - ref|| / ||ref|| (reference in float64).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Routing: tokens whose ranked selection scores are closer than this are near-ties that
# float32 rounding (~1e-7 here) may order either way; ids are compared exactly elsewhere.
ROUTE_MARGIN = 1e-6


def pytest_addoption(parser):
    parser.addoption("--device", default=None, help="cpu (Triton interpreter) or cuda; default: cuda if visible")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``interpreter_only`` run an experiment in a child process on Triton's interpreter (the CPU),
    wherever they run: on a GPU run they would repeat the CPU suite's check and take its longest minutes, while
    the GPU stages run those experiments for real. So a GPU run skips them, saying why."""
    if (config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")) != "cuda":
        return
    skip = pytest.mark.skip(reason="interpreter-only smoke test (a CPU child process): run by the CPU suite")
    for item in items:
        if item.get_closest_marker("interpreter_only"):
            item.add_marker(skip)


def pytest_configure(config):
    """With --junitxml, write <report>.provenance.json beside it (JUnit has no place for it):
    commit, date, device and versions, so a table of pass counts can say what was tested."""
    path = getattr(config.option, "xmlpath", None)
    if not path or hasattr(config, "workerinput"):  # once, in the xdist controller
        return
    import datetime
    import json
    import os
    import platform
    import subprocess
    from pathlib import Path

    import triton

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    name = config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    info = {
        "commit": os.environ.get("TRITONMOE_COMMIT") or git("rev-parse", "HEAD"),
        # as experiments/common.py records it: a bool (runs before this fix wrote the env string)
        "dirty": (os.environ["TRITONMOE_DIRTY"] == "true" if "TRITONMOE_DIRTY" in os.environ
                  else "unknown" if "TRITONMOE_COMMIT" in os.environ
                  else bool(git("status", "--porcelain", "--untracked-files=no"))),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if name == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
    }
    Path(path + ".provenance.json").parent.mkdir(parents=True, exist_ok=True)
    Path(path + ".provenance.json").write_text(json.dumps(info, indent=1) + "\n")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.exit("--device cuda asked for, but no CUDA device is visible", returncode=2)
    return torch.device(name)


def dtypes_for(device: torch.device):
    """Float dtypes the kernels are tested in: bf16 only on the GPU (the interpreter's bf16 tl.dot is wrong)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in ``out`` gives inf (never passes)."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if torch.isnan(out).any():
        return float("inf")
    out, ref = out.double().cpu(), ref.double().cpu()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out, ref, dtype, what=""):
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{what} relative error {err:.3g} > {TOLERANCE[dtype]:.0e} ({dtype})"


@pytest.fixture
def poison(monkeypatch):
    """Make torch.empty / empty_like return poison (NaN, or -7 for integers), so a kernel
    that leaves an output element unwritten fails its comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    yield


def random_topk_ids(T: int, k: int, E: int, device, generator=None) -> torch.Tensor:
    """(T, k) int32 ids, k distinct experts per token, uniformly random."""
    if T == 0:
        return torch.empty(0, k, dtype=torch.int32, device=device)
    scores = torch.rand(T, E, generator=generator)
    return scores.topk(k, dim=1).indices.to(torch.int32).to(device)
