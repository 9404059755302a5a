"""Probe: experts with uneven row counts -- the GEMMs' tile order (``sweep_n``) and tail heights.

Each GEMM program takes one (M-block, N-tile); the M-blocks of one expert's group sweep N together
(their weight tiles stream from HBM once), and every M-block is block_m rows tall, so an expert's
last block pads up to block_m - 1 rows. Two variants for routings whose experts differ in rows:

* order (``sweep_n`` > 0): the programs resident at once are a contiguous run of tiles, so with
  whole-N sweeps they belong to one or two groups: an expert with many M-blocks runs its
  compute-bound tiles alone, an expert with one its weight-bound tiles alone. Sweeping N in slices
  of sweep_n N-tiles, every group within a slice before the next, mixes them (input rows are then
  read once per slice).
* tail heights (``min_block_m`` < block_m, the kernel's tail-tile branches, with expert groups):
  an expert's last block runs with the smallest power-of-two height that holds its rows, so the
  tensor cores skip most padded rows; v4 found the extra branches slowed the full tiles at 8192
  tokens, before TMA tiles and expert groups.
* group size (``group4``, ``group8``, ``group16``; probe-only): the package grows an expert's group to
  as many M-blocks as half of L2 holds input rows for (``gemm._group_blocks``: 25 at H = 4096 and
  128-row blocks), so an expert with many rows has many programs on one weight tile at once; these cap
  it (each further group of the expert streams its weights again). A hot expert of 2048 rows runs
  1.09-1.19x slower than the same FLOPs spread over experts of 256-512 rows (PERF_LOG v17, gap 5).

Per point (a model's real routing, or the skew experiment's routing at E experts) this times each
GEMM with the tuned tiles and each variant (outputs checked against the tuned tiles' first), then
the GEMM stages of the forward (schedule, both GEMMs, combine; no routing) with the tuned tiles,
with the fastest variant per GEMM, and with the tuned tiles again (the drift).

    python -m experiments.probe_sweep          # -> results/<GPU>/probe_sweep.jsonl
    python -m experiments.probe_sweep --smoke  # CPU interpreter, tiny shapes: the probe runs, nothing written
    PROBE_POINTS="mixtral_8x7b:512,E8:512:1.5" PROBE_VARIANTS="tuned,tail16" python -m experiments.probe_sweep

"tuned" is the table's tiles as the forward runs them (its tail heights and sweep included); the
sweep and tail variants change one field of them.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import asdict, replace

import torch

import tritonmoe
from tritonmoe import gemm
from tritonmoe.configs import get_tiles
from . import common
from .latency import check, make_problem
from .skew import skewed_topk_ids
from .tune import _Bench

VARIANTS = ("tuned", "sweep1", "sweep2", "sweep4", "tail16", "tail32", "tail64", "group4", "group8", "group16")
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
    shrink = common.SMOKE_SHRINK if smoke else None
    if not name.startswith("E"):
        return common.model_spec(name, shrink)
    base = common.model_spec(SKEW_BASE, shrink)
    E = int(name[1:])
    if smoke:
        E = min(E, common.SMOKE_SHRINK["max_experts"])
    return base.replace(num_experts=E, top_k=min(SKEW_TOP_K.get(E, 8), E),
                        intermediate_size=max(16, base.num_experts * base.intermediate_size // E))


def _variant(name: str, tuned):
    """The tuned tiles as the forward runs them (expert groups), changed by ``name``; None where it does
    not apply (a tail height not below block_m). Group variants keep the tiles (see ``_group_cap``)."""
    t = replace(tuned, expert_groups=True)
    if name.startswith("sweep"):
        return replace(t, sweep_n=int(name[5:]))
    if name.startswith("tail"):
        height = int(name[4:])
        return replace(t, min_block_m=height) if height < t.block_m else None
    return t


@contextlib.contextmanager
def _group_cap(name: str):
    """For "group<n>": M-blocks per expert group capped at n while the block runs (a probe-only patch of
    ``gemm._group_blocks``, which ``gemm._launch`` calls per launch); otherwise the package's groups."""
    if not name.startswith("group"):
        yield
        return
    cap, grown = int(name[5:]), gemm._group_blocks
    gemm._group_blocks = lambda tiles, a, block_m, K: min(cap, grown(tiles, a, block_m, K))
    try:
        yield
    finally:
        gemm._group_blocks = grown


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
        bench = _Bench(p, spec, T, dtype, WARMUP_MS, REP_MS)  # runs tiles as the forward does
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
        only = os.environ.get("PROBE_VARIANTS", ",".join(VARIANTS)).split(",")
        best, tuned_exact = [], [_variant("tuned", t) for t in tuned]
        group_blocks = [gemm._group_blocks(t, p.x, t.block_m, spec.hidden_size if i == 0 else spec.intermediate_size)
                        for i, t in enumerate(tuned_exact)]
        for i, kernel in enumerate(("gate_up", "down")):
            sched = bench.sched(*tuned_exact[i].block_map)
            blocks = int(sched.num_blocks.item())
            fastest = None
            for variant in only:
                t = _variant(variant, tuned[i])
                if t is None:
                    continue
                with _group_cap(variant):
                    r = {**base, "kernel": kernel, "variant": variant, "tiles": asdict(t), "m_blocks": blocks,
                         "padded_rows_frac": blocks * t.block_m / (T * k) - 1,
                         "group_blocks": min(int(variant[5:]), group_blocks[i]) if variant.startswith("group")
                         else group_blocks[i], **bench.measure(kernel, t)}
                rows.append(r)
                print(f"  {name} T={T} {base['routing']} {kernel} {variant}: "
                      + (f"{r['ms_p50']:.3f} ms" if r["status"] == "ok" else r["status"]), flush=True)
                if r["status"] == "ok" and not variant.startswith("group") and (fastest is None
                                                                                 or r["ms_p50"] < fastest[1]):
                    fastest = (t, r["ms_p50"], variant)  # the forward below runs tiles only (no group caps)
            best.append(fastest if fastest else (tuned_exact[i], None, "tuned"))
        forward = {"tuned": tuned_exact, "best": [b[0] for b in best], "tuned_again": tuned_exact}
        run = lambda tiles: tritonmoe.fused_experts(p.x, p.w13, p.w2, bench.weights, bench.ids, tiles=tiles)  # noqa: E731
        expect = run(tuned_exact)
        ms = {}
        for variant, tiles in forward.items():
            fn = lambda tiles=tiles: run(tiles)  # noqa: E731
            err = check(fn(), expect)
            q = common.quantiles(common.time_ms(fn, dev, WARMUP_MS, REP_MS)) if err <= 1e-2 else {}
            rows.append({**base, "kernel": "forward_gemms", "variant": variant, "rel_err": err,
                         "status": "ok" if q else "wrong", **q, "tiles": [asdict(t) for t in tiles],
                         "choice": [b[2] for b in best] if variant == "best" else None})
            ms[variant] = q.get("ms_p50", float("nan"))
        choice = [b[2] for b in best]
        table.append((name, T, base["routing"], choice, ms))
        progress.step(f"{name} T={T} {base['routing']}: tuned {ms['tuned']:.3f} ms, best {choice} {ms['best']:.3f} ms")
    path = common.REPO / "results" / common.device_name(dev) / "probe_sweep.jsonl"
    if not smoke:
        common.write_rows(path, rows, ("experiment", "model", "T", "routing", "kernel", "variant", "commit"))
    print(f"\n{'point':16s} {'T':>5s} {'routing':10s} {'best (gate_up, down)':>22s} {'tuned ms':>9s} {'best ms':>9s} "
          f"{'again ms':>9s} {'gain':>6s}")
    for name, T, routing, choice, ms in table:
        gain = 100 * (1 - ms["best"] / min(ms["tuned"], ms["tuned_again"]))
        print(f"{name:16s} {T:>5d} {routing:10s} {', '.join(choice):>22s} {ms['tuned']:>9.3f} "
              f"{ms['best']:>9.3f} {ms['tuned_again']:>9.3f} {gain:>5.1f}%")
    print(f"{len(rows)} rows" + (" (smoke: not written)" if smoke else f" -> {path.relative_to(common.REPO)}"))


if __name__ == "__main__":
    main(smoke="--smoke" in sys.argv[1:])
