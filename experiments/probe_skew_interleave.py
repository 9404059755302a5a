"""Probe: do busy and one-block experts' tiles run faster side by side? (issue #7, PERF_LOG v24)

v23 counted the skew penalty: a skewed gate+up's time tracks its 128-row M-blocks' count, and a partial block
costs about a whole one, 64-row tails included (``probe_skew_group``). A model of why: an expert with one block
is weight-bound (its block streams 2 F H weights for 128 rows at most), an expert with many blocks is
compute-bound, and the GEMMs run the M-blocks expert after expert, so the GPU spends a stretch on each kind
instead of overlapping the two. With every expert's time max(weights / bandwidth, padded rows / peak) and the
experts run one after another, E = 64, T = 2048, Zipf s = 2 costs 1.08 ms of 128-row tiles (uniform: 0.65);
run side by side, max(sum of weights, sum of padded rows) = 0.86 ms, 0.74 with 64-row tails. Tails alone
help the compute-bound stretches only, which the one-block experts do not sit in: that is why they gained
1 % (v23). This times, at the skew grid's worst cells and each routing,

* ``tuned``: the tiles as the skew grid runs them;
* ``interleave``: the same with ``TileConfig.interleave`` on both GEMMs (the schedule lays out the experts with
  several blocks first, the one-block experts after them, and the programs take the one-block experts' tiles
  from the end spread evenly among the others' from the front; tiles that sweep N run without sweeps, which
  this walk does not take);
* ``interleave_per_tile``: as ``interleave`` with one program per tile where the tiles are persistent (the
  hardware then hands the next tile to whichever SM frees first: the mix adapts to how long each kind takes);
* ``tails_64``: an expert's partial last block 64 rows tall where the tiles run 128-row blocks (persistent
  tiles run per tile for it: persistent programs take full-height tiles only);
* ``interleave_tails_64``: both;
* ``interleave_swap_16``: interleaved, per tile, an expert's partial last block down to 16 rows tall, tiles under
  64 rows as the transposed product (``swap_ab``: on Hopper a wgmma whose N is the rows), so a one-block
  expert's few rows reach the tensor cores with little padding (PERF_LOG v24, gap 5h),

the experts' forward, its gate+up and its down projection alone, in one process, the variants in turns over
``ROUNDS`` rounds (the lent H100's speed drifts by a few % within a minute: the second run, one variant after
another, timed identical tiles 4-12 % apart); every forward is checked against the float64 reference first.
The first run (a2704ad) took the two ends in turn, one tile each: the gate+up at E = 64, T = 2048, s = 2 went
1.049 -> 1.020 ms and most cells 2-9 % slower. Counted in SM time, one-block experts' tiles took half the SMs
for as long as they lasted and held the busy experts' tiles to the other half; spread in proportion they take
their share. Prediction (v24): gate+up at E = 64, T = 2048, s = 2 <= 0.94 ms with ``interleave_per_tile``
(tuned 1.05). Outcomes in PERF_LOG v24.

    python -m experiments.probe_skew_interleave          # GPU -> results/<GPU>/probe_skew_interleave.jsonl
    python -m experiments.probe_skew_interleave --smoke  # CPU interpreter, tiny shapes: it runs, nothing written
"""
from __future__ import annotations

import dataclasses
import statistics
import sys

import torch

import tritonmoe
from tritonmoe import build_schedule, gate_up_silu, grouped_gemm, reference
from . import common
from .latency import CHECK_TOL, check
from .skew import PROBE_SMOKE_CELLS, probe_problem, probe_start, probe_topk_ids

CELLS = ((16, 2048), (32, 2048), (64, 2048), (128, 8192), (256, 8192))
SKEWS = ("0", "1.0", "2.0", "hot")
VARIANTS = ("tuned", "interleave", "interleave_per_tile", "tails_64", "interleave_tails_64", "interleave_swap_16")
SEED = 0
WARMUP_MS, REP_MS = 25, 100
ROUNDS = 3
KEY = ("experiment", "E", "T", "skew", "variant", "commit")


def variant_tiles(tiles, variant: str):
    """The tiles a variant runs."""
    if "tails_64" in variant and tiles.block_m > 64:
        tiles = dataclasses.replace(tiles, persistent=False, min_block_m=64)
    if variant == "interleave_swap_16":
        tiles = dataclasses.replace(tiles, persistent=False, min_block_m=16, swap_ab=True)
    if "interleave" in variant:
        tiles = dataclasses.replace(tiles, interleave=True, sweep_n=0)
    if variant == "interleave_per_tile":
        tiles = dataclasses.replace(tiles, persistent=False)
    return tiles


def main(smoke: bool = False) -> list[dict]:
    dev, dtype, base = probe_start(smoke, SEED)
    cells = PROBE_SMOKE_CELLS if smoke else CELLS
    rows = []
    progress = common.Progress(len(cells) * len(SKEWS) * len(VARIANTS), "forwards")
    for E, T in cells:
        spec, (x, w13, w2, weights), chunk, tuned = probe_problem(E, T, dev, dtype, SEED, smoke)
        H, F, k = spec.hidden_size, spec.intermediate_size, spec.top_k
        for skew in SKEWS:
            ids = probe_topk_ids(skew, T, k, E, dev, SEED)
            ref = reference.fused_experts(x, w13, w2, weights, ids)
            timed = {}  # variant -> (row, {"": forward, "gate_up_": ..., "down_": ...})
            for variant in VARIANTS:
                up_t, down_t = (variant_tiles(t, variant) for t in tuned)
                fn = lambda up_t=up_t, down_t=down_t: tritonmoe.fused_experts(  # noqa: E731
                    x, w13, w2, weights, ids, tiles=(up_t, down_t), chunk_tokens=chunk)
                row = {**base, "experiment": "probe_skew_interleave", "model": spec.name, "E": E, "T": T,
                       "k": k, "H": H, "F": F, "skew": skew, "variant": variant, "rounds": ROUNDS,
                       "gate_up_tiles": dataclasses.asdict(up_t), "down_tiles": dataclasses.asdict(down_t),
                       "chunk_tokens": chunk}
                with torch.no_grad():
                    err = check(fn(), ref)
                    if not err <= CHECK_TOL[dtype]:
                        rows.append({**row, "status": "wrong", "rel_err": err})
                        progress.step(f"E={E} T={T} s={skew} {variant}: WRONG ({err:.1e})")
                        continue
                    # each GEMM alone, on the schedule the forward builds for it (whole T: chunks are Mixtral's)
                    up_sched = build_schedule(ids, E, *up_t.block_map)
                    down_sched = build_schedule(ids, E, *down_t.block_map)
                    inter = gate_up_silu(x, w13, up_sched, up_t)
                    fns = {"": fn,
                           "gate_up_": lambda s=up_sched, t=up_t: gate_up_silu(x, w13, s, t),
                           "down_": lambda i=inter, s=down_sched, t=down_t: grouped_gemm(i, w2, s, t,
                                                                                         topk_weights=weights)}
                timed[variant] = ({**row, "status": "ok", "rel_err": err}, fns, {key: [] for key in fns})
            # The variants in turns, ROUNDS rounds (each round in another order): the lent GPU's speed drifts by
            # a few % over a minute (PERF_LOG v24), which one measurement after another would read as the variants'
            for r in range(ROUNDS):
                order = list(timed)[r % len(timed):] + list(timed)[:r % len(timed)]
                for variant in order:
                    _, fns, times = timed[variant]
                    with torch.no_grad():
                        for key, f in fns.items():
                            times[key].append(common.time_ms(f, dev, WARMUP_MS, REP_MS))
            for variant, (row, _, times) in timed.items():
                out = dict(row)
                for key, rounds in times.items():
                    out.update({f"{key}{q}": v for q, v in common.quantiles([t for ts in rounds for t in ts]).items()})
                    out[f"{key}round_ms_p50"] = [statistics.median(ts) for ts in rounds]
                rows.append(out)
                progress.step(f"E={E} T={T} s={skew} {variant}: {out['ms_p50']:.3f} ms (gate+up "
                              f"{out['gate_up_ms_p50']:.3f}, down {out['down_ms_p50']:.3f})")
        del w13, w2
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ok = {(r["E"], r["T"], r["skew"], r["variant"]): r for r in rows if r["status"] == "ok"}
    nan = {"ms_p50": float("nan"), "gate_up_ms_p50": float("nan"), "down_ms_p50": float("nan")}
    print(f"\n{'E':>4s} {'T':>5s} {'skew':>5s} " + " ".join(f"{v:>19s}" for v in VARIANTS)
          + "   (forward / gate+up / down ms; ratio: forward over uniform's, same variant)")
    for E, T in cells:
        for skew in SKEWS:
            line = []
            for v in VARIANTS:
                c, u = ok.get((E, T, skew, v), nan), ok.get((E, T, "0", v), nan)
                line.append(f"{c['ms_p50']:.3f}/{c['gate_up_ms_p50']:.3f}/{c['down_ms_p50']:.3f}"
                            f"/{c['ms_p50'] / u['ms_p50']:.2f}")
            print(f"{E:>4d} {T:>5d} {skew:>5s} " + " ".join(f"{t:>19s}" for t in line))
    common.save_probe_rows("probe_skew_interleave", dev, rows, KEY, smoke)
    return rows


if __name__ == "__main__":
    main(smoke="--smoke" in sys.argv[1:])
