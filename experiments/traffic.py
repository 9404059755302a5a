"""T4 (issue #5): memory traffic of the first expert GEMM, fused gate+up+SiLU vs unfused.

Two sources per (model, T, pipeline):

* ``analytic``: the compulsory bytes of each buffer the pipeline reads or writes (weights of the
  experts the routing touches, activations in and out, intermediates), from the shapes and the
  routing;
* ``measured``: DRAM bytes read and written by each kernel, from Nsight Compute
  (``dram__bytes_read.sum``, ``dram__bytes_write.sum``; ``--clock-control none``, caches flushed
  before each kernel, its default). ncu profiles a child process that runs only the pipeline's
  kernels (routing and schedule run before profiling starts): ``python -m experiments.traffic``.

The preprint's claim checked here: fusing gate and up removes the gate_out and up_out buffers,
"35 % of global memory traffic (~470 MB per forward on Mixtral-8x7B at 512 tokens)".
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys

import torch

from tritonmoe import build_schedule, gate_up_silu, grouped_gemm, permute, route, silu_mul
from tritonmoe.configs import get_tiles
from . import common
from .latency import make_problem

KEY = ("experiment", "model", "dtype", "T", "pipeline", "source", "item")
PIPELINES = ("fused", "unfused")
METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")


def num_steps(cfg) -> int:
    return len(_tokens(cfg)) * len(PIPELINES)


def _tokens(cfg):
    return list(cfg.profile.get("tokens") or cfg.experiment.tokens)


def _prepare(spec, T, dtype, device, seed):
    """The problem, its routing and schedule, and a runner per pipeline (the first GEMM only)."""
    p = make_problem(spec, T, dtype, device, seed)
    E, F, H, k = spec.num_experts, spec.intermediate_size, spec.hidden_size, spec.top_k
    weights, ids = route(p.router_logits(), spec, correction_bias=p.bias)
    up_t, _ = get_tiles(T, k, E, F, H, dtype, device)
    sched = build_schedule(ids, E, *up_t.block_map)

    def unfused():
        x_sorted = permute(p.x, sched)
        gate = grouped_gemm(x_sorted, p.w13, sched, up_t, n_offset=0, n=F)
        up = grouped_gemm(x_sorted, p.w13, sched, up_t, n_offset=F, n=F)
        return silu_mul(gate, up)

    runners = {"fused": lambda: gate_up_silu(p.x, p.w13, sched, up_t), "unfused": unfused}
    return p, ids, runners


def analytic_buffers(spec, T: int, distinct: int, el: int) -> dict[str, list[tuple[str, int, int]]]:
    """pipeline -> [(buffer, bytes read, bytes written)]: each buffer's compulsory traffic."""
    F, H, k = spec.intermediate_size, spec.hidden_size, spec.top_k
    S = T * k
    w_half = distinct * F * H * el
    return {
        "fused": [("x (tokens)", T * H * el, 0), ("w13 gate+up rows (touched experts)", 2 * w_half, 0),
                  ("silu(gate)*up", 0, S * F * el)],
        "unfused": [("x (tokens)", T * H * el, 0), ("x_sorted (permuted copy)", 2 * S * H * el, S * H * el),
                    ("w13 gate rows (touched experts)", w_half, 0), ("w13 up rows (touched experts)", w_half, 0),
                    ("gate_out", S * F * el, S * F * el), ("up_out", S * F * el, S * F * el),
                    ("silu(gate)*up", 0, S * F * el)],
    }


def find_ncu() -> str | None:
    return shutil.which("ncu") or next((p for p in ("/usr/local/cuda/bin/ncu",) if os.path.exists(p)), None)


def measure_with_ncu(ncu: str, model: str, T: int, pipeline: str, dtype, seed: int) -> list[dict]:
    """[{kernel, dram_read_bytes, dram_write_bytes}] per kernel launch of ``pipeline``, via ncu."""
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--metrics", ",".join(METRICS),
           "--csv", "--print-units", "base", sys.executable, "-m", "experiments.traffic", model, str(T), pipeline,
           str(dtype).replace("torch.", ""), str(seed)]
    kernels: dict[str, dict] = {}
    for r in ncu_csv(cmd):
        entry = kernels.setdefault(r["ID"], {"kernel": r["Kernel Name"].split("(")[0]})
        value = float(r["Metric Value"].replace(",", ""))
        entry["dram_read_bytes" if r["Metric Name"] == METRICS[0] else "dram_write_bytes"] = value
    return list(kernels.values())


def ncu_csv(cmd: list[str], timeout: int = 600) -> list[dict]:
    """Run an ``ncu ... --csv`` command line; its table's rows (ID, Kernel Name, Metric Name, ...)."""
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=common.REPO, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ncu exited {done.returncode}: {(done.stderr or done.stdout)[-2000:]}")
    rows = list(csv.DictReader(io.StringIO(done.stdout[done.stdout.find('"ID"'):]))) if '"ID"' in done.stdout else []
    if not rows:
        raise RuntimeError(f"ncu reported no kernels: {done.stdout[-2000:]}")
    return rows


def run(cfg, spec, device, dtype, seed, prov, ceilings, progress) -> list[dict]:
    rows = []
    ncu = find_ncu() if device.type == "cuda" else None
    el = torch.finfo(dtype).bits // 8
    for T in _tokens(cfg):
        with torch.no_grad():
            problem, ids, runners = _prepare(spec, T, dtype, device, seed)
            distinct = int(torch.unique(ids).numel())
            del problem, ids, runners  # free the weights: ncu's child process loads its own
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base = dict(experiment="traffic", model=spec.name, dtype=str(dtype).replace("torch.", ""), T=T,
                    distinct_experts=distinct, **prov)
        for pipeline, buffers in analytic_buffers(spec, T, distinct, el).items():
            for item, rd, wr in buffers:
                rows.append({**base, "pipeline": pipeline, "source": "analytic", "item": item, "status": "ok",
                             "read_bytes": rd, "write_bytes": wr})
            if ncu is None:
                why = "Nsight Compute measures CUDA kernels only" if device.type != "cuda" else "ncu not found"
                rows.append({**base, "pipeline": pipeline, "source": "measured", "item": "total", "status": "skipped",
                             "reason": why})
                progress.step(f"T={T} {pipeline}: analytic only ({why})")
                continue
            try:
                kernels = measure_with_ncu(ncu, cfg.model.name, T, pipeline, dtype, seed)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                rows.append({**base, "pipeline": pipeline, "source": "measured", "item": "total", "status": "failed",
                             "reason": str(err)[-1000:]})
                progress.step(f"T={T} {pipeline}: ncu failed")
                continue
            for i, kern in enumerate(kernels):
                rows.append({**base, "pipeline": pipeline, "source": "measured", "item": f"{i}: {kern['kernel']}",
                             "status": "ok", "read_bytes": kern.get("dram_read_bytes"),
                             "write_bytes": kern.get("dram_write_bytes")})
            rows.append({**base, "pipeline": pipeline, "source": "measured", "item": "total", "status": "ok",
                         "read_bytes": sum(k.get("dram_read_bytes", 0) for k in kernels),
                         "write_bytes": sum(k.get("dram_write_bytes", 0) for k in kernels)})
            progress.step(f"T={T} {pipeline}: {len(kernels)} kernels measured")
    return rows


def totals(rows: list[dict]) -> dict:
    """(model, T, pipeline, source) -> total bytes (read + write)."""
    out: dict = {}
    for r in rows:
        if r["status"] != "ok" or (r["source"] == "measured" and r["item"] != "total"):
            continue
        key = (r["model"], r["T"], r["pipeline"], r["source"])
        out[key] = out.get(key, 0) + r["read_bytes"] + r["write_bytes"]
    return out


def summary(rows: list[dict]) -> str:
    t = totals(rows)
    lines = [f"{'model':15s} {'T':>5s} {'source':9s} {'fused MB':>10s} {'unfused MB':>11s} {'saved MB':>9s} {'saved %':>8s}"]
    for model, T, source in sorted({(m, T, s) for m, T, _, s in t}):
        f, u = t.get((model, T, "fused", source)), t.get((model, T, "unfused", source))
        if f is None or u is None:
            lines.append(f"{model:15s} {T:5d} {source:9s} (incomplete: see the rows' status)")
            continue
        lines.append(f"{model:15s} {T:5d} {source:9s} {f / 1e6:10.1f} {u / 1e6:11.1f} {(u - f) / 1e6:9.1f} "
                     f"{100 * (u - f) / u:8.1f}")
    skipped = {r["reason"] for r in rows if r["status"] != "ok"}
    return "\n".join(lines + [f"measured: {why}" for why in sorted(skipped)])


def _probe(model: str, T: int, pipeline: str, dtype: str, seed: int) -> None:
    """Run under ncu: warm up (compile) outside the profiled range, then one profiled pass."""
    device = torch.device("cuda")
    spec = common.model_spec(model)
    with torch.no_grad():
        _, _, runners = _prepare(spec, T, getattr(torch, dtype), device, seed)
        runners[pipeline]()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        runners[pipeline]()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    _probe(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
