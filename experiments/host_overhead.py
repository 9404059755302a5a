"""Host (CPU) time per stage of one tritonmoe forward, where small T is launch-bound.

``python -m experiments.host_overhead`` on a CUDA machine. Tiny shapes keep each kernel's GPU
time to a few microseconds, so the wall time of N back-to-back calls (one sync at the end)
over N is the host time of a call. Appends a record to ``results/<GPU>/host_overhead.jsonl`` with provenance
and prints a table.
"""
from __future__ import annotations

import json
import time

import torch

import tritonmoe
import triton
import triton.language as tl
from tritonmoe import build_schedule, combine, fused_experts, gate_up_silu, grouped_gemm, route
from tritonmoe.configs import get_tiles
from tritonmoe.functional import _check_args
from tritonmoe.schedule import _histogram_kernel, _scatter_kernel
from tritonmoe.specs import MIXTRAL_8X7B
from . import common


@triton.jit
def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, offs.to(tl.float32), mask=offs < n)


def host_us(fn, n: int = 2000) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    dev = torch.device("cuda")
    spec = MIXTRAL_8X7B.replace(hidden_size=256, intermediate_size=256)  # Mixtral's routing, tiny GEMMs
    T, E, H, F, k = 1, spec.num_experts, spec.hidden_size, spec.intermediate_size, spec.top_k
    torch.manual_seed(0)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    router = torch.randn(E, H, device=dev, dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * F, H, device=dev, dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(E, H, F, device=dev, dtype=torch.bfloat16) * F ** -0.5
    logits = x @ router.T
    weights, ids = route(logits, spec)
    up_t, down_t = get_tiles(T, k, E, F, H, x.dtype, dev)
    sched = build_schedule(ids, E, up_t.block_m)
    inter = gate_up_silu(x, w13, sched, up_t)
    rows = grouped_gemm(inter, w2, sched, down_t, topk_weights=weights)
    buf = torch.empty(16, device=dev)
    S, nbins = T * k, 16
    hist = torch.empty(1, nbins, device=dev, dtype=torch.int32)
    base = torch.zeros(1, nbins, device=dev, dtype=torch.int32)
    slots = torch.empty(S, device=dev, dtype=torch.int32)
    stages = {
        "empty triton launch (3 args)": lambda: _empty_kernel[(1,)](buf, 16, BLOCK=16),
        "torch.empty": lambda: torch.empty(T, k, device=dev),
        "router matmul": lambda: x @ router.T,
        "route": lambda: route(logits, spec),
        "argument checks": lambda: _check_args(x, w13, w2, weights, ids),
        "get_tiles": lambda: get_tiles(T, k, E, F, H, x.dtype, dev),
        "histogram launch (debug=True)": lambda: _histogram_kernel[(1,)](ids, hist, S, E, BLOCK_S=16, NBINS=nbins),
        "scatter launch": lambda: _scatter_kernel[(1,)](ids, base, slots, slots, S, E, BLOCK_S=16, SUB_S=16,
                                                        NBINS=nbins),
        "build_schedule (3 launches)": lambda: build_schedule(ids, E, up_t.block_m),
        "gate_up_silu": lambda: gate_up_silu(x, w13, sched, up_t),
        "down (grouped_gemm)": lambda: grouped_gemm(inter, w2, sched, down_t, topk_weights=weights),
        "combine": lambda: combine(rows, k),
        "fused_experts": lambda: fused_experts(x, w13, w2, weights, ids),
        "route + fused_experts": lambda: fused_experts(x, w13, w2, *route(x @ router.T, spec)),
    }
    results = {name: host_us(fn) for name, fn in stages.items()}
    prov = common.provenance(dev, 0)
    out = common.REPO / "results" / common.device_name(dev) / "host_overhead.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:  # one record per run: before/after comparisons stay in the file
        f.write(json.dumps({"host_us": results, "shapes": dict(T=T, E=E, H=H, F=F, k=k), **prov}, sort_keys=True) + "\n")
    print(f"{'stage':32s} {'host us/call':>12s}")
    for name, us in results.items():
        print(f"{name:32s} {us:12.1f}")
    print(f"-> {out.relative_to(common.REPO)}")


if __name__ == "__main__":
    main()
