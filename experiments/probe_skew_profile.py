"""Probe: where a skewed routing's extra time goes in the GEMMs (issue #7, PERF_LOG gap 5).

The skew grid's worst cells (E >= 16 at T = 2048 and 8192) run 8-27 % slower under skew than under the
uniform routing, whose experts all get whole 128-row blocks. Padding to 64-row tiles (the smallest wgmma
tile) explains 4-19 % of the extra tensor-core work at those cells (``experiments/skew.py``'s exact counts),
not all of it at E = 16 (4 %, 1.20x measured). This asks Nsight Compute, kernel by kernel, at a few of those
cells under the uniform routing, Zipf s = 2, one hot expert and k hot experts alone (``skew.dense_topk_ids``):
how long each GEMM ran, how busy the tensor pipes, DRAM and L2 were, how many bytes came from DRAM and passed
through L2, and how many L2 sectors hit; with ``PROBE_VARIANTS``, as ``probe_skew_group``'s variants run it
(groups, chunks, dependent launch). A skewed GEMM that reads
more DRAM bytes re-reads weights; one whose tensor pipes and DRAM are both idler waits on latency (cold
experts' programs that stream weights for a few rows); one whose tensor pipes are busier computes padding.

ncu profiles a child process that runs the experts' forward (``tritonmoe.fused_experts``, the skew
experiment's shapes and exact routing, tuned tiles) once outside the profiled range (compiling) and once
inside; caches are flushed before each kernel (ncu's default), clocks left alone (``--clock-control none``).
Metrics the installed ncu does not know on this GPU are left out (listed in the run's output).

    python -m experiments.probe_skew_profile          # GPU -> results/<GPU>/probe_skew_profile.jsonl
    python -m experiments.probe_skew_profile 64:2048  # only these E:T cells
    PROBE_SKEWS=0,1.0 python -m experiments.probe_skew_profile 16:8192  # and only these routings
    PROBE_VARIANTS=tuned,l2_4 python -m experiments.probe_skew_profile 16:8192  # probe_skew_group's variants
"""
from __future__ import annotations

import itertools
import subprocess
import sys

import torch

import tritonmoe
from . import common
from .probe_skew_group import package_settings, probe_variants, variant_forward
from .skew import PROBE_MODEL, parse_probe_cells, probe_problem, probe_skews, probe_topk_ids
from .traffic import find_ncu, ncu_csv

CELLS = ((16, 2048), (64, 2048), (256, 8192), (128, 8192))
SKEWS = ("0", "2.0", "hot", "dense")
SEED = 0
METRICS = {  # column -> ncu metric
    "ms": "gpu__time_duration.sum",
    "dram_read_bytes": "dram__bytes_read.sum",
    "dram_write_bytes": "dram__bytes_write.sum",
    "dram_pct": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm_pct": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "tensor_gmma_pct": "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed",
    "tensor_hmma_pct": "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed",
    "l2_hit_pct": "lts__t_sector_hit_rate.pct",
    "l2_pct": "lts__t_sectors.avg.pct_of_peak_sustained_elapsed",   # L2 sector throughput, of its peak
    "l2_bytes": "lts__t_bytes.sum",                                  # bytes through L2 (reads and writes)
    "warps_active_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "grid_size": "launch__grid_size",
}
KEY = ("experiment", "E", "T", "skew", "variant", "launch", "commit")


def _child(E: int, T: int, skew: str, variant: str) -> None:
    """Run under ncu: the experts' forward (as ``probe_skew_group`` runs ``variant``) once to compile, then once
    profiled."""
    dev = torch.device("cuda")
    spec, (x, w13, w2, weights), chunk, tuned = probe_problem(E, T, dev, torch.bfloat16, SEED)
    ids = probe_topk_ids(skew, T, spec.top_k, E, dev, SEED)
    tiles, schedule, chunk_tokens = variant_forward(variant, tuned, chunk)
    with torch.no_grad(), package_settings(variant):
        for profiled in (False, True):
            if profiled:
                torch.cuda.cudart().cudaProfilerStart()
            tritonmoe.fused_experts(x, w13, w2, weights, ids, tiles=tiles, schedule=schedule, chunk_tokens=chunk_tokens)
            torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


def _known_metrics(ncu: str) -> dict:
    """The METRICS whose base name this ncu lists for the GPU (all of them if it cannot say)."""
    done = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not done.stdout.strip():
        return dict(METRICS)
    names = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    return {col: m for col, m in METRICS.items() if m.split(".")[0] in names}


def main(cells=CELLS) -> list[dict]:
    dev = torch.device("cuda")
    ncu = find_ncu()
    if ncu is None:
        raise SystemExit("probe_skew_profile: ncu not found (Nsight Compute profiles CUDA kernels only)")
    metrics = _known_metrics(ncu)
    print(f"metrics: {', '.join(metrics)}; not known here: {', '.join(set(METRICS) - set(metrics)) or 'none'}")
    base = {**common.provenance(dev, SEED), "experiment": "probe_skew_profile", "model": PROBE_MODEL}
    rows = []
    skews = probe_skews(SKEWS, "probe_skew_profile")
    variants = probe_variants(("tuned",))
    progress = common.Progress(len(cells) * len(skews) * len(variants), "routings")
    for (E, T), skew, variant in itertools.product(cells, skews, variants):
        cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--metrics",
               ",".join(metrics.values()), "--csv", "--print-units", "base", sys.executable, "-m",
               "experiments.probe_skew_profile", "--child", str(E), str(T), skew, variant]
        try:
            table = ncu_csv(cmd)
        except (RuntimeError, subprocess.TimeoutExpired) as why:
            rows.append({**base, "E": E, "T": T, "skew": skew, "variant": variant, "launch": -1,
                         "status": "error", "reason": str(why)[-400:]})
            progress.step(f"E={E} T={T} skew={skew} {variant}: ncu failed")
            continue
        launches: dict[str, dict] = {}
        by_metric = {m: col for col, m in metrics.items()}
        for r in table:
            entry = launches.setdefault(r["ID"], {"kernel": r["Kernel Name"].split("(")[0]})
            value = r["Metric Value"].replace(",", "")
            try:
                entry[by_metric[r["Metric Name"]]] = float(value)
            except (KeyError, ValueError):
                continue
        gemms = 0
        for i, (_, entry) in enumerate(sorted(launches.items(), key=lambda kv: int(kv[0]))):
            if "ms" in entry:
                entry["ms"] /= 1e6  # ns -> ms
            if "expert_gemm" in entry["kernel"]:  # the gate+up first, then the down projection
                entry["gemm"] = ("gate_up", "down")[gemms] if gemms < 2 else f"gemm{gemms}"
                gemms += 1
            rows.append({**base, "E": E, "T": T, "skew": skew, "variant": variant, "launch": i, "status": "ok",
                         **entry})
        progress.step(f"E={E} T={T} skew={skew} {variant}: {len(launches)} kernels")
    cols = [c for c in ("ms", "dram_read_bytes", "dram_pct", "tensor_gmma_pct", "tensor_hmma_pct", "l2_hit_pct",
                        "l2_pct", "l2_bytes") if c in metrics]
    head = f"{'E':>4s} {'T':>5s} {'skew':>5s} {'variant':>14s} {'gemm':8s} "
    print("\n" + head + " ".join(f"{c[:12]:>12s}" for c in cols))
    for r in rows:
        if r.get("gemm") in ("gate_up", "down"):
            print(f"{r['E']:>4d} {r['T']:>5d} {r['skew']:>5s} {r['variant'][:14]:>14s} {r['gemm']:8s} "
                  + " ".join(f"{r.get(c, float('nan')) / (1e6 if 'bytes' in c else 1):>12.3f}" for c in cols))
    print("(bytes in MB)")
    common.save_probe_rows("probe_skew_profile", dev, rows, KEY)
    return rows


if __name__ == "__main__":
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        _child(int(sys.argv[i + 1]), int(sys.argv[i + 2]), sys.argv[i + 3], sys.argv[i + 4])
    else:
        main(parse_probe_cells(sys.argv[1:], CELLS, "probe_skew_profile"))
