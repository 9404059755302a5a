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
a cell is timed in turns (``common.time_round_robin``: a power-capped GPU's drift falls on all alike). Beyond
the default run's variants, ``group_<n>`` (n blocks of one expert per group), ``l2_<d>`` (as many as 1/d of L2
holds input rows for, at least group_m: the package's rule is l2_2), ``balanced`` (an expert's groups as even as
can be, not group-size blocks at a time and the rest) and ``chunk_<n>`` (the forward in chunks of n tokens, the
same tiles; its gate+up column is the whole routing's, as for every variant), alone or joined by "+", ask whether
experts of thousands of rows (T = 8192) are grouped too widely or leave a small last group.

    python -m experiments.probe_skew_group          # GPU -> results/<GPU>/probe_skew_group.jsonl
    python -m experiments.probe_skew_group --smoke  # CPU interpreter, tiny shapes: it runs, nothing written
    PROBE_VARIANTS=tuned,l2_4,chunk_4096 PROBE_SKEWS=0,hot python -m experiments.probe_skew_group 32:8192
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

import torch

import tritonmoe
from tritonmoe import build_schedule, gate_up_silu, gemm, reference
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
    l2_2), chunk_<n> (the forward in chunks of n tokens), balanced (an expert's groups as even as can be:
    ``gemm.BALANCED_GROUPS``), or a group part and balanced and/or a chunk part joined by "+" (``l2_4+balanced``)."""
    parts = variant.split("+")
    groups = [p for p in parts if p == "group_m" or _number(p, "group") or _number(p, "l2")]
    others = [p for p in parts if p not in groups]
    known = len(parts) == 1 and variant in ("tuned", "consecutive", "tails_64") or (
        len(groups) <= 1 and len(others) == len(set(others))
        and all(p == "balanced" or _number(p, "chunk") for p in others))
    if not known:
        raise SystemExit(f"probe_skew_group: unknown variant {variant!r} (PROBE_VARIANTS; see check_variant)")
    return variant


@contextlib.contextmanager
def group_blocks(variant: str):
    """The GEMMs' blocks per group (and whether an expert's groups are balanced) as ``variant`` sets them, inside
    the block; the package's rule outside."""
    rule, balanced = gemm._group_blocks, gemm.BALANCED_GROUPS
    parts = variant.split("+")
    fixed, share = _number(variant, "group"), _number(variant, "l2")
    if "group_m" in parts:
        gemm._group_blocks = lambda tiles, a, block_m, K: tiles.group_m
    elif fixed:
        gemm._group_blocks = lambda tiles, a, block_m, K: fixed
    elif share:
        gemm._group_blocks = lambda tiles, a, block_m, K: max(
            tiles.group_m, gemm._l2_bytes(a.device) // share // (block_m * K * a.element_size()))
    if "balanced" in parts:
        gemm.BALANCED_GROUPS = True
    try:
        yield
    finally:
        gemm._group_blocks, gemm.BALANCED_GROUPS = rule, balanced


def variant_tiles(tiles, variant: str):
    """The tiles a variant runs (only ``tails_64`` changes them)."""
    if variant != "tails_64" or tiles.block_m <= 64:
        return tiles
    return dataclasses.replace(tiles, persistent=False, min_block_m=64)


def main(smoke: bool = False, cells=CELLS) -> list[dict]:
    dev, dtype, base = probe_start(smoke, SEED)
    cells = PROBE_SMOKE_CELLS if smoke else cells
    skews = probe_skews(SKEWS, "probe_skew_group")
    variants = tuple(check_variant(v.strip()) for v in os.environ.get("PROBE_VARIANTS", ",".join(VARIANTS)).split(","))
    rounds = 1 if smoke else int(os.environ.get("PROBE_ROUNDS", ROUNDS))
    rows = []
    progress = common.Progress(len(cells) * (len(skews) * len(variants) + 1), "checks and timings")
    for E, T in cells:
        spec, (x, w13, w2, weights), chunk, tuned = probe_problem(E, T, dev, dtype, SEED, smoke)
        H, F, k = spec.hidden_size, spec.intermediate_size, spec.top_k
        timed, fns = {}, {}  # (skew, variant) -> its row; timing name -> callable
        for skew in skews:
            ids = probe_topk_ids(skew, T, k, E, dev, SEED)
            ref = reference.fused_experts(x, w13, w2, weights, ids)
            if skew == "dense":  # the same k gate+up GEMMs as one batched cuBLAS product (no SiLU, nothing gathered)
                xs, wk = x.expand(k, T, H), w13[:k].transpose(1, 2)
                fns["cublas_gate_up"] = lambda xs=xs, wk=wk: torch.bmm(xs, wk)
            for variant in variants:
                up_t, down_t = (variant_tiles(t, variant) for t in tuned)
                schedule = "fixed" if variant == "consecutive" else "expert_groups"
                chunk_v = _number(variant, "chunk") or chunk
                gate_up_tiles = dataclasses.replace(up_t, expert_groups=schedule == "expert_groups")
                sched = build_schedule(ids, E, *gate_up_tiles.block_map)

                def forward(ids=ids, up_t=up_t, down_t=down_t, schedule=schedule, chunk_v=chunk_v, variant=variant):
                    with torch.no_grad(), group_blocks(variant):
                        return tritonmoe.fused_experts(x, w13, w2, weights, ids, tiles=(up_t, down_t),
                                                       schedule=schedule, chunk_tokens=chunk_v)

                def gate_up(sched=sched, gate_up_tiles=gate_up_tiles, variant=variant):
                    with torch.no_grad(), group_blocks(variant):
                        return gate_up_silu(x, w13, sched, gate_up_tiles)

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
                progress.step(f"E={E} T={T} s={skew} {variant}: checked ({err:.1e})")
            del ref
        # every check first, then every forward and gate+up of the cell timed in turns (common.time_round_robin)
        times = common.time_round_robin(fns, dev, rounds, SEED)
        cublas = {f"cublas_gate_up_{key}": v for key, v in common.quantiles(times["cublas_gate_up"]).items()} \
            if "cublas_gate_up" in times else {}
        for (skew, variant), row in timed.items():
            up = common.quantiles(times[f"{skew}/{variant}/gate_up"])
            rows.append({**row, **common.quantiles(times[f"{skew}/{variant}/forward"]),
                         **{f"gate_up_{key}": v for key, v in up.items()}, **(cublas if skew == "dense" else {})})
        progress.step(f"E={E} T={T}: {len(fns)} callables timed in {rounds} rounds")
        del w13, w2, fns
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ok = {(r["E"], r["T"], r["skew"], r["variant"]): r for r in rows if r["status"] == "ok"}
    nan = {"ms_p50": float("nan"), "gate_up_ms_p50": float("nan")}
    print(f"\n{'E':>4s} {'T':>5s} {'skew':>5s} " + " ".join(f"{v:>11s}" for v in variants)
          + "   (forward ms / gate+up ms per variant)")
    for E, T in cells:
        for skew in skews:
            cells_txt = (ok.get((E, T, skew, v), nan) for v in variants)
            print(f"{E:>4d} {T:>5d} {skew:>5s} "
                  + " ".join(f"{c['ms_p50']:>5.3f}/{c['gate_up_ms_p50']:<5.3f}" for c in cells_txt))
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
