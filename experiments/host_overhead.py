"""Host (CPU) time per stage of one tritonmoe forward, where small T is launch-bound.

``python -m experiments.host_overhead`` on a CUDA machine. Tiny GEMMs (H = F = 256) keep each
kernel's GPU time to a few microseconds, so the wall time of N back-to-back calls (one sync at
the end) over N is the host time of a call. Measured for Mixtral's routing (E=8, k=2) and
Qwen2-57B-A14B's (E=64, k=8) at T = 1 and 64: the stages, a Triton launch through
``kernel[grid]`` and through ``tritonmoe._launch.launch``, and, with transformers installed,
its experts modules (``experts_implementation`` "tritonmoe" and "grouped_mm") and its router
against ``tritonmoe.route``. Appends one record to ``results/<GPU>/host_overhead.jsonl`` with
provenance and prints a table.
"""
from __future__ import annotations

import json
import time

import torch

import tritonmoe
import triton
import triton.language as tl
from tritonmoe import build_schedule, combine, fused_experts, gate_up_silu, grouped_gemm, route
from tritonmoe._launch import launch
from tritonmoe.configs import get_tiles
from tritonmoe.functional import _check_args
from tritonmoe.specs import MIXTRAL_8X7B, QWEN2_57B_A14B
from . import common

TOKENS = (1, 64)


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


def transformers_stages(spec, x, w13, w2) -> dict:
    """transformers' Mixtral experts module under each implementation, and its router, on these
    weights; empty without transformers >= 5."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralTopKRouter
        import tritonmoe.integrations.transformers  # noqa: F401  (registers "tritonmoe")
    except ImportError:
        return {}
    E, k, H, F = spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size
    config = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k)
    router = MixtralTopKRouter(config).to(x.device, x.dtype)
    _, weights, ids = router(x)  # what the model hands its experts: float32 weights, int64 ids
    stages = {"transformers router (MixtralTopKRouter)": lambda: router(x),
              "linear + tritonmoe.route": lambda: route(torch.nn.functional.linear(x, router.weight), spec)}
    for impl in ("tritonmoe", "grouped_mm"):
        config._experts_implementation = impl
        experts = MixtralExperts(config).to(x.device, x.dtype)
        with torch.no_grad():
            experts.gate_up_proj.copy_(w13)
            experts.down_proj.copy_(w2)
        stages[f"transformers experts, {impl}"] = lambda m=experts: m(x, ids, weights)
    return stages


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    buf = torch.empty(16, device=dev)
    results = {"empty Triton launch, kernel[grid] (3 args)": host_us(lambda: _empty_kernel[(1,)](buf, 16, BLOCK=16)),
               "empty Triton launch, tritonmoe launch()": host_us(lambda: launch(_empty_kernel, (1,), (buf, 16, 16))),
               "torch.empty": host_us(lambda: torch.empty(8, 8, device=dev))}
    for base in (MIXTRAL_8X7B, QWEN2_57B_A14B):
        spec = base.replace(hidden_size=256, intermediate_size=256)  # the model's routing, tiny GEMMs
        E, H, F, k = spec.num_experts, spec.hidden_size, spec.intermediate_size, spec.top_k
        w13 = torch.randn(E, 2 * F, H, device=dev, dtype=torch.bfloat16) * H ** -0.5
        w2 = torch.randn(E, H, F, device=dev, dtype=torch.bfloat16) * F ** -0.5
        router = torch.randn(E, H, device=dev, dtype=torch.bfloat16)
        for T in TOKENS:
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            logits = x @ router.T
            weights, ids = route(logits, spec)
            up_t, down_t = get_tiles(T, k, E, F, H, x.dtype, dev)
            sched = build_schedule(ids, E, up_t.block_m)
            inter = gate_up_silu(x, w13, sched, up_t)
            rows = grouped_gemm(inter, w2, sched, down_t, topk_weights=weights)
            stages = {
                "router matmul": lambda: x @ router.T,
                "route": lambda: route(logits, spec),
                "argument checks": lambda: _check_args(x, w13, w2, weights, ids),
                "get_tiles": lambda: get_tiles(T, k, E, F, H, x.dtype, dev),
                "build_schedule": lambda: build_schedule(ids, E, up_t.block_m),
                "gate_up_silu": lambda: gate_up_silu(x, w13, sched, up_t),
                "down (grouped_gemm)": lambda: grouped_gemm(inter, w2, sched, down_t, topk_weights=weights),
                "combine": lambda: combine(rows, k),
                "fused_experts": lambda: fused_experts(x, w13, w2, weights, ids),
                "fused_experts, int64 ids": lambda: fused_experts(x, w13, w2, weights, ids.long()),
                "torch.ops.tritonmoe.fused_experts": lambda: torch.ops.tritonmoe.fused_experts(x, w13, w2, weights,
                                                                                                ids),
                "route + fused_experts": lambda: fused_experts(x, w13, w2, *route(x @ router.T, spec)),
                **transformers_stages(spec, x, w13, w2),
            }
            for name, fn in stages.items():
                results[f"{spec.name} T={T}: {name}"] = host_us(fn)
    prov = common.provenance(dev, 0)
    out = common.REPO / "results" / common.device_name(dev) / "host_overhead.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:  # one record per run: before/after comparisons stay in the file
        f.write(json.dumps({"host_us": results, "shapes": dict(H=256, F=256, tokens=list(TOKENS)), **prov},
                           sort_keys=True) + "\n")
    print(f"{'stage':70s} {'host us/call':>12s}")
    for name, us in results.items():
        print(f"{name:70s} {us:12.1f}")
    print(f"-> {out.relative_to(common.REPO)}")


if __name__ == "__main__":
    main()
