"""Probe: how many rows each expert gets in the latency grid, and what that costs a tiled GEMM in padding.

The grid's floor counts the FLOPs of the rows the routing makes (2 T k 3 H F), but a tensor-core GEMM
computes whole tiles: on Hopper ``tl.dot`` becomes a wgmma only where a program's tile is at least 64 rows
high (``../shared/PERF_NOTES.md``: smaller tiles run the older mma.sync), so an expert with c rows costs at
least ceil(c / 64) * 64 rows of wgmma work. Where the floor is set (or nearly) by the FLOPs, that padding is
work no wgmma kernel can skip. This records, for every (model, T) of the grid, each expert's row count as
the forward routes it (the latency experiment's inputs and ``tritonmoe.route``), and the rows a GEMM
computes when each expert is padded to 16, 64 and 128 rows. Notebook 03 turns them into the padded floor.

Counts only: nothing is timed. The inputs are drawn on the GPU (CUDA's generator: the CPU's gives other
tokens), so the counts of the grid's GPU runs come from a GPU run.

    python -m experiments.probe_routing          # GPU -> results/<GPU>/probe_routing.jsonl
    python -m experiments.probe_routing --smoke  # CPU, tiny shapes: it runs, nothing written
"""
from __future__ import annotations

import sys
from dataclasses import replace

import torch

import tritonmoe
from . import common
from .latency import make_problem

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
MODELS = ("mixtral_8x7b", "qwen2_57b_a14b", "deepseek_v3")
PAD_ROWS = (16, 64, 128)
SEED = 0  # the latency experiment's seed
KEY = ("experiment", "model", "T", "commit")


def padded_rows(counts: list[int], tile: int) -> int:
    """Rows a GEMM computes when each expert's rows are padded to whole tiles of ``tile`` rows."""
    return sum(-(-c // tile) * tile for c in counts)


def main(smoke: bool = False) -> list[dict]:
    dev, dtype = (torch.device("cpu"), torch.float32) if smoke else (torch.device("cuda"), torch.bfloat16)
    tokens = (1, 8, 32) if smoke else TOKENS
    base = {**common.provenance(dev, SEED), "experiment": "probe_routing"}
    rows = []
    progress = common.Progress(len(MODELS) * len(tokens), "points")
    for model in MODELS:
        spec = common.model_spec(model, common.SMOKE_SHRINK if smoke else None)
        p = make_problem(spec, max(tokens), dtype, dev, SEED)  # the first T rows of the same draw at every T
        for T in tokens:
            q = replace(p, x=p.x[:T])
            logits = tritonmoe.router_logits(q.x, q.router_weight, float32=spec.router_fp32)
            _, ids = tritonmoe.route(logits, spec, correction_bias=q.bias)
            counts = torch.bincount(ids.flatten().long(), minlength=spec.num_experts).tolist()
            S = T * spec.top_k
            assert sum(counts) == S, f"{model} T={T}: {sum(counts)} routed slots, expected {S}"
            rows.append({**base, "model": model, "T": T, "top_k": spec.top_k, "num_experts": spec.num_experts,
                         "slots": S, "expert_counts": counts, "distinct_experts": sum(c > 0 for c in counts),
                         "max_count": max(counts),
                         **{f"padded_rows_{m}": padded_rows(counts, m) for m in PAD_ROWS}})
            progress.step(f"{model} T={T}")
        del p
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{'model':15s} {'T':>5s} {'rows/E':>7s} {'max':>5s} {'distinct':>8s} "
          + " ".join(f"{'pad' + str(m):>7s}" for m in PAD_ROWS) + "   (padded rows / routed rows)")
    for r in rows:
        print(f"{r['model']:15s} {r['T']:>5d} {r['slots'] / r['num_experts']:>7.1f} {r['max_count']:>5d} "
              f"{r['distinct_experts']:>8d} "
              + " ".join(f"{r[f'padded_rows_{m}'] / r['slots']:>7.3f}" for m in PAD_ROWS))
    common.save_probe_rows("probe_routing", dev, rows, KEY, smoke)
    return rows


if __name__ == "__main__":
    main(smoke="--smoke" in sys.argv[1:])
