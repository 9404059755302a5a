"""Where the latency results stand against issue #4's targets, as a Markdown table.

``python -m experiments.status [results/<device>/latency.jsonl]`` reads committed rows only
(tritonmoe fused eager and CUDA-graph, Megablocks, the torch._grouped_mm pipeline) and
prints, per (model, T): bytes, FLOPs, the floor and which ceiling sets it, the times, the
ratio to the faster baseline, the fraction of the floor, and the run's commit; then the
geometric-mean speedup over Megablocks and every point that misses a target.
Targets: at least as fast as the faster baseline; >= 85 % of the floor where it is set by
HBM bandwidth, >= 75 % where it is set by the measured bf16 matmul rate.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent.parent / "results" / "NVIDIA_H100_80GB_HBM3" / "latency.jsonl"


def load(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["model"], r["T"], r["impl"], r["mode"]): r for r in rows if r["status"] == "ok"}


def report(d: dict) -> str:
    out = ["| model | T | bytes (GB) | GFLOP | floor ms | set by | fused ms (p20–p80) | graph ms | Megablocks ms "
           "| grouped_mm ms | vs faster baseline | % of floor | commit |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    speedups, misses = {}, []
    for (m, T, impl, mode), r in sorted(d.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if impl != "tritonmoe_fused" or mode != "eager":
            continue
        f = r["ms_p50"]
        g = d.get((m, T, impl, "cuda_graph"), {}).get("ms_p50")
        mb = d[(m, T, "megablocks", "eager")]["ms_p50"]
        gm = d[(m, T, "torch_grouped_mm", "eager")]["ms_p50"]
        speedups.setdefault(m, []).append(mb / f)
        hbm = r["bytes"] / r["hbm_read_Bps"] >= r["flops"] / r["bf16_flops"]
        frac, target = r["floor_ms"] / f, (0.85 if hbm else 0.75)
        if f > min(mb, gm):
            misses.append(f"{m} T={T}: slower than the faster baseline ({f:.3f} vs {min(mb, gm):.3f} ms)")
        if frac < target:
            misses.append(f"{m} T={T}: {frac:.1%} of the {'bandwidth' if hbm else 'compute'} floor "
                          f"(target {target:.0%})" + (f"; as a CUDA graph {r['floor_ms'] / g:.1%}" if g else ""))
        out.append(f"| {m} | {T} | {r['bytes'] / 1e9:.2f} | {r['flops'] / 1e9:.0f} | {r['floor_ms']:.3f} | "
                   f"{'HBM' if hbm else 'bf16 MMA'} | {f:.3f} ({r['ms_p20']:.3f}–{r['ms_p80']:.3f}) | "
                   f"{f'{g:.3f}' if g else '—'} | {mb:.3f} | {gm:.3f} | {min(mb, gm) / f:.2f}× | {frac:.0%} | "
                   f"{r['commit'][:7]} |")
    gmean = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs))  # noqa: E731
    every = [x for xs in speedups.values() for x in xs]
    out += ["", f"Geometric-mean speedup over Megablocks ({len(every)} points, eager): {gmean(every):.2f}× "
            f"(" + ", ".join(f"{m} {gmean(xs):.2f}×" for m, xs in speedups.items()) + ")", "",
            f"Points that miss a target ({len(misses)}):"] + [f"- {x}" for x in misses]
    return "\n".join(out)


if __name__ == "__main__":
    print(report(load(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)))
