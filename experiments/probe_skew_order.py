"""Probe: does the order of the experts decide how much a skewed routing costs? (issue #7, PERF_LOG gap 5d)

Under Zipf s = 2 the gate+up's tensor pipes and DRAM are both less busy than under uniform routing
(`probe_skew_profile`, v22). One reading: the GEMM's programs run expert after expert (the schedule lays the
M-blocks out in expert-id order, and a group of an expert's blocks sweeps N together), so a hot expert's
compute-bound programs fill the GPU for a stretch, then the cold experts' weight-bound ones, instead of side
by side. If so, where the hot experts sit in id order should matter. The skew routing ranks experts by a random
permutation; this relabels the same routing so that the most popular experts come

* ``as_grid``: where the skew grid puts them (random ids);
* ``hot_first`` / ``hot_last``: first / last in id order (the longest compute-bound stretch);
* ``spread``: evenly apart (rank r -> id r * P mod E, P = E / 8 + 1, odd: the top eight E / 8 + 1 apart),

and times the experts' forward (tuned tiles, as the skew grid runs it) for each, beside uniform routing, in one
process; every output is checked against the float64 reference first. The experts' weights are drawn i.i.d., so
a relabelled routing is the same problem with other weights.

    python -m experiments.probe_skew_order          # GPU -> results/<GPU>/probe_skew_order.jsonl
    python -m experiments.probe_skew_order --smoke  # CPU interpreter, tiny shapes: it runs, nothing written
"""
from __future__ import annotations

import sys

import torch

import tritonmoe
from tritonmoe import reference
from . import common
from .latency import CHECK_TOL, check
from .skew import PROBE_SMOKE_CELLS, expert_counts, probe_problem, probe_start, probe_topk_ids

CELLS = ((16, 2048), (64, 2048), (128, 8192), (256, 8192))
SKEWS = ("2.0", "hot")
ORDERS = ("as_grid", "hot_first", "hot_last", "spread")
SEED = 0
WARMUP_MS, REP_MS = 25, 200
KEY = ("experiment", "E", "T", "skew", "order", "commit")


def relabel(ids: torch.Tensor, counts_by_rank: list[int], E: int, order: str) -> torch.Tensor:
    """``ids`` with every expert renamed by ``order`` from its popularity rank (ties: by old id)."""
    if order == "as_grid":
        return ids
    counts = torch.bincount(ids.flatten().long(), minlength=E)
    assert sorted(counts.tolist(), reverse=True) == sorted(counts_by_rank, reverse=True), "not the skew's counts"
    rank_of = torch.empty(E, dtype=torch.long)
    rank_of[torch.argsort(-counts, stable=True)] = torch.arange(E)   # old id -> popularity rank
    step = E // 8 + 1 if E >= 8 else 1
    target = {"hot_first": rank_of, "hot_last": E - 1 - rank_of, "spread": (rank_of * step) % E}[order]
    assert len(set(target.tolist())) == E, f"{order}: not a permutation at E={E}"
    return target.to(torch.int32)[ids.long().cpu()].to(ids.device)


def main(smoke: bool = False) -> list[dict]:
    dev, dtype, base = probe_start(smoke, SEED)
    cells = PROBE_SMOKE_CELLS if smoke else CELLS
    rows = []
    progress = common.Progress(len(cells) * (1 + len(SKEWS) * len(ORDERS)), "forwards")
    for E, T in cells:
        spec, (x, w13, w2, weights), _, _ = probe_problem(E, T, dev, dtype, SEED, smoke)  # the forward picks its tiles
        H, F, k = spec.hidden_size, spec.intermediate_size, spec.top_k
        for skew in ("0",) + SKEWS:
            grid_ids, counts = probe_topk_ids(skew, T, k, E, "cpu", SEED), expert_counts(T, k, E, skew)
            for order in (("as_grid",) if skew == "0" else ORDERS):
                ids = relabel(grid_ids, counts, E, order).to(dev)
                fn = lambda ids=ids: tritonmoe.fused_experts(x, w13, w2, weights, ids)  # noqa: E731
                row = {**base, "experiment": "probe_skew_order", "model": spec.name, "E": E, "T": T,
                       "k": k, "H": H, "F": F, "skew": skew, "order": order,
                       "first_hot_ids": ids.flatten().long().bincount(minlength=E).argsort(descending=True)[:8].tolist()}
                with torch.no_grad():
                    err = check(fn(), reference.fused_experts(x, w13, w2, weights, ids))
                    if not err <= CHECK_TOL[dtype]:
                        rows.append({**row, "status": "wrong", "rel_err": err})
                        progress.step(f"E={E} T={T} s={skew} {order}: WRONG ({err:.1e})")
                        continue
                    q = common.quantiles(common.time_ms(fn, dev, WARMUP_MS, REP_MS))
                rows.append({**row, "status": "ok", "rel_err": err, **q})
                progress.step(f"E={E} T={T} s={skew} {order}: {q['ms_p50']:.3f} ms")
        del w13, w2
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ok = {(r["E"], r["T"], r["skew"], r["order"]): r["ms_p50"] for r in rows if r["status"] == "ok"}
    print(f"\n{'E':>4s} {'T':>5s} {'skew':>5s} {'uniform':>8s} " + " ".join(f"{o:>9s}" for o in ORDERS)
          + "   (ms under uniform routing, then each order's time / uniform's)")
    for E, T in cells:
        uni = ok.get((E, T, "0", "as_grid"), float("nan"))
        for skew in SKEWS:
            print(f"{E:>4d} {T:>5d} {skew:>5s} {uni:>8.3f} "
                  + " ".join(f"{ok.get((E, T, skew, o), float('nan')) / uni:>9.3f}" for o in ORDERS))
    common.save_probe_rows("probe_skew_order", dev, rows, KEY, smoke)
    return rows


if __name__ == "__main__":
    main(smoke="--smoke" in sys.argv[1:])
