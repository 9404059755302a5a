"""Probe: the order of the GEMMs' tiles -- N swept a few tiles at a time over all M-blocks (``sweep_n``).

Each GEMM program takes one (M-block, N-tile); the M-blocks of one expert's group sweep N together
(their weight tiles stream from HBM once). The programs resident at once are a contiguous run of
tiles, so with whole-N sweeps they belong to one or two groups: an expert with many M-blocks runs
its compute-bound tiles alone, an expert with one its weight-bound tiles alone, and the two never
overlap. Under skew this follows the phase model sum_e max(weights_e / HBM, blocks_e * tile time)
instead of max(sum of weights / HBM, sum of blocks * tile time) (PERF_LOG v15). ``sweep_n`` > 0
sweeps N in slices of that many N-tiles, every group within a slice before the next, so the
resident programs mix groups; the input rows are then read once per slice.

Per point (a model's real routing, or the skew experiment's routing at E experts) this times each
GEMM with the tuned tiles at sweep_n in SWEEPS (each output checked against the tuned tiles'
first), then the whole forward with the tuned tiles, with the fastest sweep per GEMM, and with the
tuned tiles again (drift).

    python -m experiments.probe_sweep          # -> results/<GPU>/probe_sweep.jsonl
    python -m experiments.probe_sweep --smoke  # CPU interpreter, tiny shapes: the probe runs, nothing written
    PROBE_POINTS="mixtral_8x7b:512,E8:512:1.5" python -m experiments.probe_sweep
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, replace

import torch

import tritonmoe
from tritonmoe.configs import get_tiles
from . import common
from .latency import check, make_problem
from .skew import skewed_topk_ids
from .tune import _Bench

SWEEPS = (0, 1, 2, 4, 8, 16)
# (model or "E<experts>", T, skew or None): real routing; skew experiment's routing (Mixtral's H and
# weight bytes, k=2 at E=8, 4 at 16, else 8) at its uniform control and two skews
POINTS = [("mixtral_8x7b", 512, None), ("mixtral_8x7b", 1024, None), ("mixtral_8x7b", 2048, None),
          ("qwen2_57b_a14b", 512, None), ("qwen2_57b_a14b", 1024, None), ("qwen2_57b_a14b", 2048, None),
          ("deepseek_v3", 2048, None), ("deepseek_v3", 4096, None),
          ("E8", 512, "0"), ("E8", 512, "1.5"), ("E8", 512, "hot"), ("E8", 2048, "0"), ("E8", 2048, "1.5"),
          ("E32", 512, "0"), ("E32", 512, "2.0"), ("E64", 2048, "0"), ("E64", 2048, "2.0")]
SKEW_BASE, SKEW_TOP_K = "mixtral_8x7b", {8: 2, 16: 4}
SEED = 0
WARMUP_MS, REP_MS = 25, 100
SMOKE_SHAPES = {"hidden_size": 64, "intermediate_size": 32, "max_experts": 16, "shared_intermediate_size": 48}


def _points(smoke: bool):
    if os.environ.get("PROBE_POINTS"):  # "model:T" or "E<n>:T:skew", comma-separated
        out = []
        for item in os.environ["PROBE_POINTS"].split(","):
            parts = item.split(":")
            out.append((parts[0], int(parts[1]), parts[2] if len(parts) > 2 else None))
        return out
    if smoke:
        return [("mixtral_8x7b", 40, None), ("E8", 40, "1.5")]
    return POINTS


def _spec(name: str, smoke: bool):
    """The model's spec, or for "E<n>" the skew experiment's: Mixtral's H and weight bytes over n experts."""
    shrink = SMOKE_SHAPES if smoke else None
    if not name.startswith("E"):
        return common.model_spec(name, shrink)
    base = common.model_spec(SKEW_BASE, shrink)
    E = int(name[1:])
    if smoke:
        E = min(E, SMOKE_SHAPES["max_experts"])
    return base.replace(num_experts=E, top_k=min(SKEW_TOP_K.get(E, 8), E),
                        intermediate_size=max(16, base.num_experts * base.intermediate_size // E))


def main(smoke: bool = False) -> None:
    dev, dtype = (torch.device("cpu"), torch.float32) if smoke else (torch.device("cuda"), torch.bfloat16)
    prov = common.provenance(dev, SEED)
    ceilings = common.measure_ceilings(dev, 100, 500)
    print(f"ceilings: HBM {ceilings['hbm_read_Bps'] / 1e12:.2f} TB/s, bf16 {ceilings['bf16_flops'] / 1e12:.0f} TFLOP/s",
          flush=True)
    points = _points(smoke)
    rows, table = [], []
    progress = common.Progress(len(points), "points")
    problems = {}
    for name, T, skew in points:
        spec = _spec(name, smoke)
        if name not in problems:  # weights built once per model (the largest T of its points)
            problems.clear()
            torch.cuda.empty_cache() if dev.type == "cuda" else None
            problems[name] = make_problem(spec, max(t for n, t, _ in points if n == name), dtype, dev, SEED)
        p = replace(problems[name], x=problems[name].x[:T])
        E, k = spec.num_experts, spec.top_k
        bench = _Bench(p, spec, T, dtype, WARMUP_MS, REP_MS)
        if skew is not None:
            g = torch.Generator(device=dev).manual_seed(SEED)
            bench.ids = skewed_topk_ids(T, k, E, skew, seed=SEED).to(dev)
            w = torch.rand(T, k, generator=g, device=dev)
            bench.weights = w / w.sum(1, keepdim=True)
        tuned = get_tiles(T, k, E, spec.intermediate_size, spec.hidden_size, dtype, dev)
        counts = torch.bincount(bench.ids.flatten().long(), minlength=E)
        base = {**prov, **ceilings, "experiment": "probe_sweep", "model": name, "E": E, "k": k, "T": T,
                "routing": "model" if skew is None else f"skew={skew}", "max_count": int(counts.max()),
                "distinct_experts": int((counts > 0).sum())}
        best = []
        for i, kernel in enumerate(("gate_up", "down")):
            sched = bench.sched(tuned[i].block_m)
            blocks = int(sched.num_blocks.item())
            fastest = None
            for sweep in SWEEPS:
                t = replace(tuned[i], sweep_n=sweep)
                r = {**base, "kernel": kernel, "variant": f"sweep{sweep}", "tiles": asdict(t), "m_blocks": blocks,
                     "padded_rows_frac": blocks * t.block_m / (T * k) - 1, **bench.measure(kernel, t)}
                rows.append(r)
                print(f"  {name} T={T} {base['routing']} {kernel} sweep_n={sweep}: "
                      + (f"{r['ms_p50']:.3f} ms" if r["status"] == "ok" else r["status"]), flush=True)
                if r["status"] == "ok" and (fastest is None or r["ms_p50"] < fastest[1]):
                    fastest = (t, r["ms_p50"])
            best.append(fastest[0] if fastest else tuned[i])
        forward = {"tuned": tuned, "best_sweep": tuple(best), "tuned_again": tuned}
        expect = tritonmoe.fused_experts(p.x, p.w13, p.w2, bench.weights, bench.ids, tiles=tuned)
        ms = {}
        for variant, tiles in forward.items():
            fn = lambda tiles=tiles: tritonmoe.fused_experts(p.x, p.w13, p.w2, bench.weights, bench.ids,  # noqa: E731
                                                             tiles=tiles)
            err = check(fn(), expect)
            q = common.quantiles(common.time_ms(fn, dev, WARMUP_MS, REP_MS)) if err <= 1e-2 else {}
            rows.append({**base, "kernel": "forward_experts", "variant": variant, "rel_err": err,
                         "status": "ok" if q else "wrong", **q, "tiles": [asdict(t) for t in tiles],
                         "sweep_n": [t.sweep_n for t in tiles]})
            ms[variant] = q.get("ms_p50", float("nan"))
        table.append((name, T, base["routing"], [t.sweep_n for t in best], ms))
        progress.step(f"{name} T={T} {base['routing']}: tuned {ms['tuned']:.3f} ms, "
                      f"sweep {[t.sweep_n for t in best]} {ms['best_sweep']:.3f} ms")
    path = common.REPO / "results" / common.device_name(dev) / "probe_sweep.jsonl"
    if not smoke:
        common.write_rows(path, rows, ("experiment", "model", "T", "routing", "kernel", "variant", "commit"))
    print(f"\n{'point':16s} {'T':>5s} {'routing':10s} {'sweep (gu, dn)':>14s} {'tuned ms':>9s} {'sweep ms':>9s} "
          f"{'again ms':>9s} {'gain':>6s}")
    for name, T, routing, sweeps, ms in table:
        gain = 100 * (1 - ms["best_sweep"] / ms["tuned"])
        print(f"{name:16s} {T:>5d} {routing:10s} {str(tuple(sweeps)):>14s} {ms['tuned']:>9.3f} "
              f"{ms['best_sweep']:>9.3f} {ms['tuned_again']:>9.3f} {gain:>5.1f}%")
    print(f"{len(rows)} rows" + (" (smoke: not written)" if smoke else f" -> {path.relative_to(common.REPO)}"))


if __name__ == "__main__":
    main(smoke="--smoke" in sys.argv[1:])
