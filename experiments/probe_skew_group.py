"""Probe: does how M-blocks are grouped decide how much a skewed routing costs? (issue #7, PERF_LOG gap 5d)

`probe_skew_order` (v23) found that spreading the hot experts in id order gains at most 1 % over the skew grid's
random labels (bunching them costs up to 8 %), so the slow-down is not the hot experts' programs running apart
from the cold experts'. Padded rows explain part of it (an expert's partial last block; uniform routing in the
skew grid pads none), not all: at E = 16, T = 2048, Zipf s = 2 the gate+up was 29 % slower with 8 % more rows
padded, its tensor pipes and DRAM both less busy (`probe_skew_profile`, v22's tiles). What a skewed routing changes besides is the groups: blocks of one expert that sweep N
together. The GEMMs group up to as many of an expert's blocks as half of L2 holds input rows for
(``gemm._group_blocks``), so a hot expert of 16 blocks sweeps N as one group of 16 where uniform routing's
experts make groups of 2-4. This times the experts' forward and its gate+up alone, at the skew grid's worst
cells, under uniform, Zipf(2) and one-hot-expert routings, and a routing of k hot experts and nothing else
(``dense``: every token on experts 0..k-1, each of them a GEMM of T rows, no row padded, fewer weights read; the
issue's "one large GEMM that is easy to run fast"; cuBLAS's batched product of the same k GEMMs is timed beside
it), with

* ``tuned``: the tiles and groups as the skew grid runs them;
* ``group_m``, ``group_2``, ``group_64``: groups of the tiles' group_m, 2 or 64 blocks of one expert instead
  (``gemm._group_blocks`` replaced for the call: the probe's only change to the package's code path);
* ``consecutive``: groups of group_m consecutive blocks, across experts (``schedule="fixed"``);
* ``tails_64``: an expert's partial last block 64 rows tall where the tuned tiles run 128-row blocks
  (persistent gate+up tiles run per tile for it: persistent programs take full-height tiles only),

in one process; every output is checked against the float64 reference first, then every forward and gate+up of
a cell is timed in turns (``common.time_round_robin``: a power-capped GPU's drift falls on all alike), and with
them the forward's down projection and combine alone on its own intermediate rows. Beyond the default run's
variants, ``group_<n>`` (n blocks of one expert per group), ``l2_<d>`` (as many as 1/d of L2 holds input rows
for, at least group_m: the package's rule is l2_2), ``no_pdl`` (no programmatic dependent launch) and
``chunk_<n>`` (the forward in chunks of n tokens, the same tiles; its stage columns are the whole routing's),
alone or joined by "+", ask whether experts of thousands of rows (T = 8192) are grouped too widely, and where in
the forward a skewed routing's time goes. (Rows at d4aa90d and 77937af also time ``balanced``: an expert's groups
as even as can be, a kernel option measured no faster and removed after them, PERF_LOG v26.)

    python -m experiments.probe_skew_group          # GPU -> results/<GPU>/probe_skew_group.jsonl
    python -m experiments.probe_skew_group --smoke  # CPU interpreter, tiny shapes: it runs, nothing written
    PROBE_VARIANTS=tuned,l2_4,chunk_4096 PROBE_SKEWS=0,hot python -m experiments.probe_skew_group 32:8192
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys

import torch

import tritonmoe
from tritonmoe import _launch, build_schedule, gate_up_silu, gemm, grouped_gemm, reference
from tritonmoe.functional import _schedule_tiles
from tritonmoe.permute import combine
from . import common
from .latency import CHECK_TOL, check
from .skew import PROBE_SMOKE_CELLS, parse_probe_cells, probe_problem, probe_skews, probe_start, probe_topk_ids

CELLS = ((16, 2048), (64, 2048), (128, 8192), (256, 8192))
SKEWS = ("0", "2.0", "hot", "dense")  # "dense": every token on experts 0..k-1 (k full-T GEMMs, none padded)
VARIANTS = ("tuned", "group_m", "group_2", "group_64", "consecutive", "tails_64")  # the default run
SEED = 0
ROUNDS = 15  # rounds of common.time_round_robin on the GPU (PROBE_ROUNDS)
KEY = ("experiment", "E", "T", "skew", "variant", "commit")


def _number(variant: str, prefix: str) -> int | None:
    """n of a ``<prefix>_<n>`` part of a variant (n >= 1; parts joined by "+"), else None."""
    for part in variant.split("+"):
        head, _, n = part.rpartition("_")
        if head == prefix and n.isdigit() and int(n) >= 1:
            return int(n)
    return None


def check_variant(variant: str) -> str:
    """``variant`` if the probe knows it: tuned, consecutive, tails_64, group_m, group_<n> (n blocks of one expert
    per group), l2_<d> (as many blocks as 1/d of L2 holds input rows for, at least group_m; the package's rule is
    l2_2), chunk_<n> (the forward in chunks of n tokens), no_pdl (every launch waits for the previous kernel's end:
    ``_launch.PDL``), or a group part with no_pdl and/or a chunk part, joined by "+" (``l2_4+no_pdl``)."""
    parts = variant.split("+")
    groups = [p for p in parts if p == "group_m" or _number(p, "group") or _number(p, "l2")]
    others = [p for p in parts if p not in groups]
    known = len(parts) == 1 and variant in ("tuned", "consecutive", "tails_64") or (
        len(groups) <= 1 and len(others) == len(set(others))
        and all(p == "no_pdl" or _number(p, "chunk") for p in others))
    if not known:
        raise SystemExit(f"probe_skew_group: unknown variant {variant!r} (PROBE_VARIANTS; see check_variant)")
    return variant


@contextlib.contextmanager
def package_settings(variant: str):
    """The package as ``variant`` sets it inside the block (the GEMMs' blocks per group, dependent launch); as it
    was outside."""
    rule, pdl = gemm._group_blocks, _launch.PDL
    parts = variant.split("+")
    fixed, share = _number(variant, "group"), _number(variant, "l2")
    if "group_m" in parts:
        gemm._group_blocks = lambda tiles, a, block_m, K: tiles.group_m
    elif fixed:
        gemm._group_blocks = lambda tiles, a, block_m, K: fixed
    elif share:
        gemm._group_blocks = lambda tiles, a, block_m, K: max(
            tiles.group_m, gemm._l2_bytes(a.device) // share // (block_m * K * a.element_size()))
    if "no_pdl" in parts:
        _launch.PDL = False
    try:
        yield
    finally:
        gemm._group_blocks, _launch.PDL = rule, pdl


def probe_variants(default) -> tuple[str, ...]:
    """The variants a run times: ``PROBE_VARIANTS`` (comma-separated, each checked), else ``default``."""
    return tuple(check_variant(v.strip()) for v in os.environ.get("PROBE_VARIANTS", ",".join(default)).split(","))


def variant_forward(variant: str, tuned, chunk):
    """What ``fused_experts`` runs for a variant: ((gate_up, down) tiles, schedule, chunk_tokens), from the tuned
    tiles and chunk of the cell."""
    tiles = tuple(variant_tiles(t, variant) for t in tuned)
    return tiles, "fixed" if variant == "consecutive" else "expert_groups", _number(variant, "chunk") or chunk


def variant_tiles(tiles, variant: str):
    """The tiles a variant runs (only ``tails_64`` changes them)."""
    if variant != "tails_64" or tiles.block_m <= 64:
        return tiles
    return dataclasses.replace(tiles, persistent=False, min_block_m=64)


def main(smoke: bool = False, cells=CELLS) -> list[dict]:
    dev, dtype, base = probe_start(smoke, SEED)
    cells = PROBE_SMOKE_CELLS if smoke else cells
    skews = probe_skews(SKEWS, "probe_skew_group")
    variants = probe_variants(VARIANTS)
    rounds = 1 if smoke else int(os.environ.get("PROBE_ROUNDS", ROUNDS))
    rows = []
    progress = common.Progress(len(cells) * (len(skews) * len(variants) + 1), "checks and timings")
    for E, T in cells:
        spec, (x, w13, w2, weights), chunk, tuned = probe_problem(E, T, dev, dtype, SEED, smoke)
        H, F, k = spec.hidden_size, spec.intermediate_size, spec.top_k
        up_0, down_0 = (_schedule_tiles(t, "expert_groups") for t in tuned)  # the tuned tiles as the forward runs them
        timed, fns = {}, {}  # (skew, variant) -> its row; timing name -> callable
        for skew in skews:
            ids = probe_topk_ids(skew, T, k, E, dev, SEED)
            ref = reference.fused_experts(x, w13, w2, weights, ids)
            if skew == "dense":  # the same k gate+up GEMMs as one batched cuBLAS product (no SiLU, nothing gathered)
                xs, wk = x.expand(k, T, H), w13[:k].transpose(1, 2)
                fns["cublas_gate_up"] = lambda xs=xs, wk=wk: torch.bmm(xs, wk)
            # the forward's stages after the gate+up, timed alone on its own intermediate rows (tuned tiles): the down
            # projection per variant below, the combine (no variant changes it) once per routing
            with torch.no_grad():
                inter = gate_up_silu(x, w13, build_schedule(ids, E, *up_0.block_map), up_0)
                if not down_0.atomic_combine:
                    slot_rows = grouped_gemm(inter, w2, build_schedule(ids, E, *down_0.block_map), down_0,
                                             topk_weights=weights)
                    fns[f"{skew}/combine"] = lambda s=slot_rows, n=k * down_0.split_k: combine(s, n, dtype=x.dtype)
            for variant in variants:
                (up_t, down_t), schedule, chunk_v = variant_forward(variant, tuned, chunk)
                gate_up_tiles, down_tiles = (_schedule_tiles(t, schedule) for t in (up_t, down_t))
                sched = build_schedule(ids, E, *gate_up_tiles.block_map)
                down_sched = build_schedule(ids, E, *down_tiles.block_map)

                def forward(ids=ids, up_t=up_t, down_t=down_t, schedule=schedule, chunk_v=chunk_v, variant=variant):
                    with torch.no_grad(), package_settings(variant):
                        return tritonmoe.fused_experts(x, w13, w2, weights, ids, tiles=(up_t, down_t),
                                                       schedule=schedule, chunk_tokens=chunk_v)

                def gate_up(sched=sched, gate_up_tiles=gate_up_tiles, variant=variant):
                    with torch.no_grad(), package_settings(variant):
                        return gate_up_silu(x, w13, sched, gate_up_tiles)

                def down(inter=inter, down_sched=down_sched, down_tiles=down_tiles, variant=variant):
                    with torch.no_grad(), package_settings(variant):
                        return grouped_gemm(inter, w2, down_sched, down_tiles, topk_weights=weights)

                row = {**base, "experiment": "probe_skew_group", "model": spec.name, "E": E, "T": T,
                       "k": k, "H": H, "F": F, "skew": skew, "variant": variant, "schedule": schedule,
                       "gate_up_tiles": dataclasses.asdict(up_t), "down_tiles": dataclasses.asdict(down_t),
                       "chunk_tokens": chunk_v, "timing": "round_robin", "rounds": rounds}
                err = check(forward(), ref)
                if not err <= CHECK_TOL[dtype]:
                    rows.append({**row, "status": "wrong", "rel_err": err})
                    progress.step(f"E={E} T={T} s={skew} {variant}: WRONG ({err:.1e})")
                    continue
                timed[skew, variant] = {**row, "status": "ok", "rel_err": err}
                fns[f"{skew}/{variant}/forward"], fns[f"{skew}/{variant}/gate_up"] = forward, gate_up
                if not down_tiles.atomic_combine:  # (an atomic down projection adds into the output: no combine)
                    fns[f"{skew}/{variant}/down"] = down
                progress.step(f"E={E} T={T} s={skew} {variant}: checked ({err:.1e})")
            del ref, inter
        # every check first, then every forward and gate+up of the cell timed in turns (common.time_round_robin)
        times = common.time_round_robin(fns, dev, rounds, SEED)
        cublas = {f"cublas_gate_up_{key}": v for key, v in common.quantiles(times["cublas_gate_up"]).items()} \
            if "cublas_gate_up" in times else {}
        for (skew, variant), row in timed.items():
            parts = {f"{part}_{key}": v for part, name in (("gate_up", f"{skew}/{variant}/gate_up"),
                                                           ("down", f"{skew}/{variant}/down"),
                                                           ("combine", f"{skew}/combine")) if name in times
                     for key, v in common.quantiles(times[name]).items()}
            rows.append({**row, **common.quantiles(times[f"{skew}/{variant}/forward"]), **parts,
                         **(cublas if skew == "dense" else {})})
        progress.step(f"E={E} T={T}: {len(fns)} callables timed in {rounds} rounds")
        del w13, w2, fns
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ok = {(r["E"], r["T"], r["skew"], r["variant"]): r for r in rows if r["status"] == "ok"}
    parts = ("ms_p50", "gate_up_ms_p50", "down_ms_p50", "combine_ms_p50")
    print(f"\n{'E':>4s} {'T':>5s} {'skew':>5s} " + " ".join(f"{v[:23]:>23s}" for v in variants)
          + "   (median ms per variant: forward / gate+up / down / combine, each timed alone)")
    for E, T in cells:
        for skew in skews:
            cells_txt = (ok.get((E, T, skew, v), {}) for v in variants)
            print(f"{E:>4d} {T:>5d} {skew:>5s} "
                  + " ".join(f"{'/'.join(f'{c.get(p, math.nan):.2f}' for p in parts):>23s}" for c in cells_txt))
    for E, T in cells:
        dense = ok.get((E, T, "dense", "tuned"), {})
        if "cublas_gate_up_ms_p50" in dense:
            print(f"E={E} T={T} dense: cuBLAS's batched gate+up {dense['cublas_gate_up_ms_p50']:.3f} ms")
    common.save_probe_rows("probe_skew_group", dev, rows, KEY, smoke)
    return rows


if __name__ == "__main__":
    args = sys.argv[1:]
    main(smoke="--smoke" in args,
         cells=parse_probe_cells([a for a in args if a != "--smoke"], CELLS, "probe_skew_group"))
