"""Host (CPU) time per stage of one tritonmoe forward, where small T is launch-bound.

``python -m experiments.host_overhead`` on a CUDA machine. Tiny GEMMs (H = F = 256) keep each
kernel's GPU time to a few microseconds, so the wall time of N back-to-back calls (one sync at
the end) over N is the host time of a call. Measured for Mixtral's routing (E=8, k=2) and
Qwen2-57B-A14B's (E=64, k=8) at T = 1 and 64: the stages, a Triton launch through
``kernel[grid]`` and through ``tritonmoe._launch.launch``, and, with transformers installed,
its experts modules (``experts_implementation`` "tritonmoe" and "grouped_mm") and its router
against ``tritonmoe.route``; under ``torch.no_grad``, as in inference. All stages are timed in
interleaved rounds (``host_us``). Appends one record to ``results/<GPU>/host_overhead.jsonl``
with provenance and prints a table.
"""
from __future__ import annotations

import copy
import gc
import json
import statistics
import time

import torch

import tritonmoe
import triton
import triton.language as tl
from tritonmoe import build_schedule, combine, fused_experts, gate_up_silu, grouped_gemm, route
from tritonmoe import _launch
from tritonmoe._launch import launch
from tritonmoe.configs import get_tiles
from tritonmoe.functional import _check_args
from tritonmoe.specs import MIXTRAL_8X7B, QWEN2_57B_A14B
from . import common

TOKENS = (1, 64)
ROUNDS = 7


@triton.jit
def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, offs.to(tl.float32), mask=offs < n)


def host_us(stages: dict, calls: int = 200, rounds: int = ROUNDS) -> dict:
    """Host microseconds per call of each stage: the median over ``rounds`` rounds, each timing
    ``calls`` back-to-back calls of every stage in turn (one sync at the end), so that drift of the
    host's speed reaches all stages alike; garbage collection paused while timing. Also min and max."""
    for fn in stages.values():
        for _ in range(20):
            fn()
    torch.cuda.synchronize()
    per_round = {name: [] for name in stages}
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in stages.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
                per_round[name].append((time.perf_counter() - t0) / calls * 1e6)
    finally:
        gc.enable()
    return {name: {"median": statistics.median(us), "min": min(us), "max": max(us)} for name, us in per_round.items()}


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
    with torch.no_grad():  # the module's weight starts uninitialised (transformers initialises models, not modules)
        router.weight.normal_(0, H ** -0.5)
    _, weights, ids = router(x)  # what the model hands its experts: float32 weights, int64 ids
    stages = {"transformers router (MixtralTopKRouter)": lambda: router(x),
              "linear + tritonmoe.route": lambda: route(torch.nn.functional.linear(x, router.weight), spec)}
    for impl in ("tritonmoe", "grouped_mm"):
        own = copy.deepcopy(config)  # the module looks its implementation up in its config at each call
        own._experts_implementation = impl
        experts = MixtralExperts(own).to(x.device, x.dtype)
        with torch.no_grad():
            experts.gate_up_proj.copy_(w13)
            experts.down_proj.copy_(w2)
        stages[f"transformers experts, {impl}"] = lambda m=experts: m(x, ids, weights)
    with torch.no_grad():
        outs = [stages[f"transformers experts, {impl}"]() for impl in ("tritonmoe", "grouped_mm")]
    err = float((outs[0].float() - outs[1].float()).norm() / outs[1].float().norm())
    assert err < 2e-2, f"transformers experts: tritonmoe vs grouped_mm relative error {err:.3g}"
    return stages


def without_direct_launch(fn):
    """``fn`` with every kernel launched through ``kernel[grid]`` (tritonmoe._launch's direct path off)."""
    def call():
        _launch._direct = False
        try:
            fn()
        finally:
            _launch._direct = direct
    direct = _launch._direct
    return call


def model_stages(spec, T: int, dev) -> dict:
    """The stages of one forward with ``spec``'s routing at T tokens, each a call on fixed inputs."""
    E, H, F, k = spec.num_experts, spec.hidden_size, spec.intermediate_size, spec.top_k
    w13 = torch.randn(E, 2 * F, H, device=dev, dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(E, H, F, device=dev, dtype=torch.bfloat16) * F ** -0.5
    router = torch.randn(E, H, device=dev, dtype=torch.bfloat16)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    logits = x @ router.T
    weights, ids = route(logits, spec)
    ids64 = ids.long()
    up_t, down_t = get_tiles(T, k, E, F, H, x.dtype, dev)
    sched = build_schedule(ids, E, *up_t.block_map)
    inter = gate_up_silu(x, w13, sched, up_t)
    rows = grouped_gemm(inter, w2, sched, down_t, topk_weights=weights)
    forward = lambda: fused_experts(x, w13, w2, weights, ids)  # noqa: E731
    return {
        "router matmul": lambda: x @ router.T,
        "route": lambda: route(logits, spec),
        "argument checks": lambda: _check_args(x, w13, w2, weights, ids),
        "get_tiles": lambda: get_tiles(T, k, E, F, H, x.dtype, dev),
        "build_schedule": lambda: build_schedule(ids, E, *up_t.block_map),
        "gate_up_silu": lambda: gate_up_silu(x, w13, sched, up_t),
        "down (grouped_gemm)": lambda: grouped_gemm(inter, w2, sched, down_t, topk_weights=weights),
        "combine": lambda: combine(rows, k),
        "fused_experts": forward,
        "fused_experts, every launch through kernel[grid]": without_direct_launch(forward),
        "fused_experts, int64 ids": lambda: fused_experts(x, w13, w2, weights, ids64),
        "torch.ops.tritonmoe.fused_experts": lambda: torch.ops.tritonmoe.fused_experts(x, w13, w2, weights, ids),
        "route + fused_experts": lambda: fused_experts(x, w13, w2, *route(x @ router.T, spec)),
        **transformers_stages(spec, x, w13, w2),
    }


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    buf = torch.empty(16, device=dev)
    stages = {"empty Triton launch, kernel[grid] (3 args)": lambda: _empty_kernel[(1,)](buf, 16, BLOCK=16),
              "empty Triton launch, tritonmoe launch()": lambda: launch(_empty_kernel, (1,), (buf, 16, 16)),
              "torch.empty": lambda: torch.empty(8, 8, device=dev)}
    for base in (MIXTRAL_8X7B, QWEN2_57B_A14B):
        spec = base.replace(hidden_size=256, intermediate_size=256)  # the model's routing, tiny GEMMs
        for T in TOKENS:
            stages.update({f"{spec.name} T={T}: {name}": fn for name, fn in model_stages(spec, T, dev).items()})
    with torch.no_grad():  # inference, as transformers' generate runs it
        results = host_us(stages)
    prov = common.provenance(dev, 0)
    out = common.REPO / "results" / common.device_name(dev) / "host_overhead.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:  # one record per run: before/after comparisons stay in the file
        f.write(json.dumps({"host_us": {name: r["median"] for name, r in results.items()}, "host_us_spread": results,
                            "rounds": ROUNDS, "shapes": dict(H=256, F=256, tokens=list(TOKENS)), **prov},
                           sort_keys=True) + "\n")
    print(f"{'stage':70s} {'host us/call: median (min-max of ' + str(ROUNDS) + ' rounds)':>44s}")
    for name, r in results.items():
        print(f"{name:70s} {r['median']:12.1f} ({r['min']:.1f}-{r['max']:.1f})")
    print(f"-> {out.relative_to(common.REPO)}")


if __name__ == "__main__":
    main()
