"""Probe: does the length of a timing run change the compute-bound end? (PERF_LOG gap 1)

The tuner times each GEMM in bursts of 25 ms of repeats; the latency grid times the whole forward, and
the bf16 matmul that sets its compute ceiling, over 500 ms. At Mixtral T=1024 the tuner's two GEMMs
summed to 1.38 ms where the grid's forward took 1.65 ms (PERF_LOG v15). Here, per point, in one
process on the same inputs and in interleaved order, each of: the forward as the grid times it
(router, routing, experts), the experts alone (``fused_experts`` on fixed routing), the tuner's two
GEMM stages timed one after the other (its ``_Bench``), and the 8192^3 bf16 matmul of the ceilings,
with do_bench's repeats lasting 25 ms and then 500 ms. ``nvidia-smi`` samples the SM clock, power and
its throttle reasons every 100 ms meanwhile (``probe_power.<commit>.smi.csv`` beside the rows).

    python -m experiments.probe_power          # -> results/<GPU>/probe_power.jsonl
"""
from __future__ import annotations

import statistics
import subprocess

import torch

import tritonmoe
from tritonmoe.configs import get_tiles
from tritonmoe.specs import get_spec
from . import common
from .impls import IMPLS
from .latency import make_problem
from .tune import _Bench

POINTS = (("mixtral_8x7b", 1024), ("qwen2_57b_a14b", 2048), ("deepseek_v3", 8192))
REPS_MS = (25, 500)
WARMUP_MS = 100
SEED = 0


def _median_ms(fn, device, rep_ms) -> float:
    return statistics.median(common.time_ms(fn, device, WARMUP_MS, rep_ms))


def main() -> None:
    dev = torch.device("cuda")
    prov = common.provenance(dev, SEED)
    out_dir = common.REPO / "results" / common.device_name(dev)
    out_dir.mkdir(parents=True, exist_ok=True)
    smi_path = out_dir / f"probe_power.{prov['commit'][:7]}.smi.csv"
    # -f: nvidia-smi writes the file itself (its stdout into a file is block-buffered, and what was
    # buffered when it is stopped is lost: the first run's file, cd0c93f, holds its first 25 s only)
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,power.limit,"
                            "clocks_throttle_reasons.active", "--format=csv", "-lms", "100", "-f", str(smi_path)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    rows = []
    try:
        for name, T in POINTS:
            spec = get_spec(name)
            p = make_problem(spec, T, torch.bfloat16, dev, SEED)
            weights, ids = tritonmoe.route(p.router_logits(), spec, correction_bias=p.bias)
            gate_up, down = get_tiles(T, spec.top_k, spec.num_experts, spec.intermediate_size, spec.hidden_size,
                                      torch.bfloat16, dev)
            bench = _Bench(p, spec, T, torch.bfloat16, WARMUP_MS, REPS_MS[0])
            fns = {
                "forward": IMPLS["tritonmoe_fused"](p),
                "experts": lambda: tritonmoe.fused_experts(p.x, p.w13, p.w2, weights, ids),
                "gemm_gate_up": bench.fn("gate_up", gate_up),
                "gemm_down": bench.fn("down", down),
                "matmul_8192": lambda: a @ b,
            }
            for fn in fns.values():
                fn()
            torch.cuda.synchronize()
            flops = 2 * T * spec.top_k * 3 * spec.hidden_size * spec.intermediate_size
            for rep_ms in REPS_MS:
                ms = {what: _median_ms(fn, dev, rep_ms) for what, fn in fns.items()}
                ms["gemms"] = ms["gemm_gate_up"] + ms["gemm_down"]
                peak = 2 * 8192 ** 3 / (ms["matmul_8192"] * 1e-3)
                row = {**prov, "probe": "power", "model": name, "T": T, "rep_ms": rep_ms, "warmup_ms": WARMUP_MS,
                       "ms": ms, "bf16_flops": peak,
                       "pct_of_peak": {w: flops / (ms[w] * 1e-3) / peak for w in ("forward", "experts", "gemms")}}
                rows.append(row)
                pct = row["pct_of_peak"]
                print(f"{name} T={T} rep {rep_ms} ms: forward {ms['forward']:.3f} ({100 * pct['forward']:.0f} %), "
                      f"experts {ms['experts']:.3f}, gemms {ms['gemms']:.3f} ({100 * pct['gemms']:.0f} %), "
                      f"matmul {ms['matmul_8192']:.3f} ms = {peak / 1e12:.0f} TFLOP/s", flush=True)
            del p, bench, fns
            torch.cuda.empty_cache()
    finally:
        smi.terminate()
    path = out_dir / "probe_power.jsonl"
    common.write_rows(path, rows, ("probe", "model", "T", "rep_ms", "commit"))
    print(f"{len(rows)} rows -> {path.relative_to(common.REPO)}; clocks and power -> "
          f"{smi_path.relative_to(common.REPO)}")


if __name__ == "__main__":
    main()
