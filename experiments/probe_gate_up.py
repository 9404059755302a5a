"""Probe: why Mixtral-8x7B's fused gate+up GEMM slows more than linearly from T=4096 to T=8192.

PERF_LOG gap 1. On the H100 the tuned gate+up kernel ran 3.0 ms at T=4096 and 7.7 ms at
T=8192 (2.55x the time for 2x the work; the down projection scales 1.7x). This times, in one
process on the same weights: the kernel at T = 2048, 4096, 8192; the whole forward at T=8192
against two T=4096 halves; and, with Nsight Compute when present, the kernel's SM clock,
DRAM and L2 numbers at each T (one child process per T runs the kernel once).

    python -m experiments.probe_gate_up            # -> results/<GPU>/probe_gate_up.jsonl
"""
from __future__ import annotations

import subprocess
import sys

from dataclasses import replace

import torch

import tritonmoe
from tritonmoe import build_schedule, gate_up_silu
from tritonmoe.configs import get_tiles
from tritonmoe.specs import get_spec
from . import common
from .impls import IMPLS
from .latency import make_problem
from .traffic import find_ncu, ncu_csv

TOKENS = (2048, 4096, 8192)
SEED = 0


def _gate_up(p, spec, T: int):
    """The gate+up call of the forward at T tokens (the first T rows of ``p``), with its tuned tiles."""
    x = p.x[:T]
    _, ids = tritonmoe.route(replace(p, x=x).router_logits(), spec)
    tiles, _ = get_tiles(T, spec.top_k, spec.num_experts, spec.intermediate_size, spec.hidden_size, x.dtype,
                         x.device)
    sched = build_schedule(ids.to(torch.int32), spec.num_experts, *tiles.block_map)
    return (lambda: gate_up_silu(x, p.w13, sched, tiles)), tiles


def child(T: int) -> None:
    """Run the gate+up kernel twice (the first compiles): the process ncu profiles."""
    spec = get_spec("mixtral_8x7b")
    fn, _ = _gate_up(make_problem(spec, T, torch.bfloat16, torch.device("cuda"), SEED), spec, T)
    for _ in range(2):
        fn()
    torch.cuda.synchronize()


def _ncu(T: int, ncu: str) -> dict:
    cmd = [ncu, "--clock-control", "none", "--kernel-name", "regex:_expert_gemm_kernel", "--launch-skip", "1",
           "--launch-count", "1", "--section", "SpeedOfLight", "--section", "Occupancy",
           "--section", "MemoryWorkloadAnalysis", "--csv", "--page", "details",
           sys.executable, "-m", "experiments.probe_gate_up", "--child", str(T)]
    try:
        rows = ncu_csv(cmd, timeout=240)
    except (RuntimeError, subprocess.TimeoutExpired) as why:
        return {"ncu_error": str(why)[-400:]}
    return {f"ncu:{r['Metric Name']} ({r['Metric Unit']})": r["Metric Value"] for r in rows}


def main() -> None:
    dev = torch.device("cuda")
    prov = common.provenance(dev, SEED)
    spec = get_spec("mixtral_8x7b")
    p = make_problem(spec, max(TOKENS), torch.bfloat16, dev, SEED)
    rows = []
    for T in TOKENS:
        fn, tiles = _gate_up(p, spec, T)
        flops = 2 * T * spec.top_k * 2 * spec.intermediate_size * spec.hidden_size
        q = common.quantiles(common.time_ms(fn, dev, 100, 500))
        rows.append({**prov, "probe": "gate_up", "T": T, "tiles": str(tiles), **q,
                     "TFLOPs": flops / q["ms_p50"] / 1e9})
        print(f"gate_up T={T}: {q['ms_p50']:.3f} ms, {flops / q['ms_p50'] / 1e9:.0f} TFLOP/s  ({tiles})", flush=True)
    # the whole forward at the largest T against its two halves (which read the weights twice)
    T, half = max(TOKENS), max(TOKENS) // 2
    whole = IMPLS["tritonmoe_fused"](p)
    first = IMPLS["tritonmoe_fused"](replace(p, x=p.x[:half]))
    second = IMPLS["tritonmoe_fused"](replace(p, x=p.x[half:]))
    q_whole = common.quantiles(common.time_ms(whole, dev, 100, 500))
    q_halves = common.quantiles(common.time_ms(lambda: (first(), second()), dev, 100, 500))
    rows.append({**prov, "probe": "forward_whole", "T": T, **q_whole})
    rows.append({**prov, "probe": "forward_two_halves", "T": T, **q_halves})
    print(f"forward T={T}: whole {q_whole['ms_p50']:.3f} ms, two halves of {half} {q_halves['ms_p50']:.3f} ms",
          flush=True)
    ncu = find_ncu()
    if ncu:
        for r in [r for r in rows if r["probe"] == "gate_up"]:
            r.update(_ncu(r["T"], ncu))
            keys = [k for k in r if k.startswith("ncu:") and any(s in k for s in (
                "SM Frequency", "DRAM Throughput", "Duration", "L2 Hit Rate", "Compute (SM) Throughput",
                "Achieved Occupancy", "Registers Per Thread"))]
            print(f"ncu T={r['T']}: " + "; ".join(f"{k[4:]}={r[k]}" for k in keys) + (r.get("ncu_error") or ""),
                  flush=True)
    path = common.REPO / "results" / common.device_name(dev) / "probe_gate_up.jsonl"
    common.write_rows(path, rows, ("probe", "T", "commit"))
    print(f"{len(rows)} rows -> {path.relative_to(common.REPO)}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
    else:
        main()
