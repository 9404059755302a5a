"""Probe: where a decode forward's GPU time goes (PERF_LOG gap 3).

At T <= 2 the fused forward, replayed from a CUDA graph, sits at 76-86 % of the bandwidth floor.
This replays the whole layer forward (router matmul, routing, schedule, gate+up, down, combine)
from a CUDA graph under the PyTorch profiler (CUPTI) and records each kernel's duration and the
idle gap before it, per model and T, so the gap to the floor splits into the GEMMs' own time and
what the small kernels and the boundaries between kernels cost. The profiler's clock is the
GPU's; a replay's span is from its first kernel's start to its last kernel's end. Variant
"sanitize_overflow" is the control for the launch option that leaves out Triton's int32 overflow
checks (``tritonmoe._launch.OPTIONS``), which the schedule's debug=True kernels otherwise compile in;
"torch_router" the control for ``tritonmoe.router_logits`` (the router matmul as PyTorch runs it);
"route_4_warps" the routing kernel with 4 warps at every size (the control for PERF_LOG v14).

    python -m experiments.probe_decode            # -> results/<GPU>/probe_decode.jsonl
"""
from __future__ import annotations

import statistics
from dataclasses import replace
from importlib import import_module

import torch

import tritonmoe
from tritonmoe import _launch
from tritonmoe.specs import get_spec
from . import common
from .impls import EXPERTS, IMPLS
from .latency import make_problem

route = import_module("tritonmoe.route")  # the module (tritonmoe.route is the function)
MODELS = ("mixtral_8x7b", "qwen2_57b_a14b", "deepseek_v3")
TOKENS = (1, 2)
REPLAYS = 20
SEED = 0
# launch options over the default; "torch_router": the router matmul in PyTorch instead of tritonmoe.router_logits;
# "route_4_warps": the routing kernel with 4 warps at every size (before PERF_LOG v14)
VARIANTS = {"default": {}, "sanitize_overflow": {"sanitize_overflow": True}, "torch_router": {}, "route_4_warps": {}}


def _short(name: str) -> str:
    for key in ("_router", "_route", "_schedule", "_histogram", "_scan", "_scatter", "_expert_gemm", "_combine"):
        if key in name:
            return key.strip("_")
    return "torch:" + name[:40]


def timeline(graph) -> list[list[dict]]:
    """Kernels of REPLAYS graph replays: per replay, (kernel, start us, duration us) in order."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(REPLAYS):
            graph.replay()
            torch.cuda.synchronize()  # replays apart, so each one's kernels group by the gaps
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and "Memcpy" not in e.name and "Memset" not in e.name), key=lambda e: e.time_range.start)
    per = len(kernels) // REPLAYS
    if per * REPLAYS != len(kernels):
        raise RuntimeError(f"{len(kernels)} kernels over {REPLAYS} replays: not a whole number per replay")
    return [[{"kernel": _short(e.name), "start_us": e.time_range.start, "dur_us": e.time_range.elapsed_us()}
             for e in kernels[i * per:(i + 1) * per]] for i in range(REPLAYS)]


def _profile(p, name: str, T: int, variant: str, prov: dict, ceilings: dict) -> dict:
    pt = replace(p, x=p.x[:T])
    if variant == "torch_router":  # the router matmul as PyTorch computes it (the other implementations' way)
        experts = EXPERTS["tritonmoe_fused"](pt)
        fn = lambda: experts(*tritonmoe.route(pt.router_logits(), pt.spec, correction_bias=pt.bias))  # noqa: E731
    else:
        fn = IMPLS["tritonmoe_fused"](pt)
    graph, _ = common.capture_graph(fn)
    replays = timeline(graph)
    spans = [r[-1]["start_us"] + r[-1]["dur_us"] - r[0]["start_us"] for r in replays]
    kernels = []
    for i, kernel in enumerate(k["kernel"] for k in replays[0]):
        durs = [r[i]["dur_us"] for r in replays]
        gaps = [r[i]["start_us"] - (r[i - 1]["start_us"] + r[i - 1]["dur_us"]) if i else 0.0 for r in replays]
        kernels.append({"kernel": kernel, "dur_us": statistics.median(durs), "gap_before_us": statistics.median(gaps)})
    line = " | ".join(f"{k['kernel']} {k['dur_us']:.1f}" + (f" (+{k['gap_before_us']:.1f})" if i else "")
                      for i, k in enumerate(kernels))
    print(f"{name} T={T} {variant}: span {statistics.median(spans):.1f} us: {line}", flush=True)
    return {**prov, **ceilings, "probe": "decode_graph", "variant": variant, "model": name, "T": T,
            "replays": REPLAYS, "span_us_p50": statistics.median(spans), "span_us_min": min(spans),
            "span_us_max": max(spans), "kernels": kernels}


def main() -> None:
    dev = torch.device("cuda")
    prov = common.provenance(dev, SEED)
    ceilings = common.measure_ceilings(dev, 100, 500)
    rows = []
    for name in MODELS:
        spec = get_spec(name)
        p = make_problem(spec, max(TOKENS), torch.bfloat16, dev, SEED)
        for T in TOKENS:
            for variant, options in VARIANTS.items():
                default, one_warp = dict(_launch.OPTIONS), route.ONE_WARP_ELEMENTS
                _launch.OPTIONS.update(options)
                if variant == "route_4_warps":
                    route.ONE_WARP_ELEMENTS = 0
                _launch._compiled.clear()  # kernels compiled with other options
                try:
                    rows.append(_profile(p, name, T, variant, prov, ceilings))
                finally:
                    _launch.OPTIONS.clear()
                    _launch.OPTIONS.update(default)
                    route.ONE_WARP_ELEMENTS = one_warp
                    _launch._compiled.clear()
        del p
        torch.cuda.empty_cache()
    path = common.REPO / "results" / common.device_name(dev) / "probe_decode.jsonl"
    common.write_rows(path, rows, ("probe", "model", "T", "variant", "commit"))
    print(f"{len(rows)} rows -> {path.relative_to(common.REPO)}")


if __name__ == "__main__":
    main()
