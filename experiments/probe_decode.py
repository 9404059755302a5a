"""Probe: where a decode forward's GPU time goes (PERF_LOG gap 3).

At T <= 2 the fused forward, replayed from a CUDA graph, sits at 76-86 % of the bandwidth floor.
This replays the whole layer forward (router matmul, routing, schedule, gate+up, down, combine)
from a CUDA graph under the PyTorch profiler (CUPTI) and records each kernel's duration and the
idle gap before it, per model and T, so the gap to the floor splits into the GEMMs' own time and
what the small kernels and the boundaries between kernels cost. The profiler's clock is the
GPU's; a replay's span is from its first kernel's start to its last kernel's end. Variants:
"default" (a slot schedule at T = 1, ``functional.SLOT_SCHEDULE_MAX_TOKENS``), "built_schedule"
(the schedule kernel at every T: the control for PERF_LOG v16) and "slot_schedule" (a slot schedule
at every T: the measurement for raising that limit) with programmatic dependent launch (each kernel's
programs may start while the previous kernel's last ones run, ``tritonmoe._launch``), and "no_pdl", the
default without it (PERF_LOG v20). With it a kernel's programs may start, and wait, before the previous
kernel ends, so a kernel's duration can include that wait and the gap before it can be negative; the span
is what the floor compares with. The controls of earlier versions (Triton's overflow checks, PyTorch's
router matmul, the routing kernel in 4 warps) are in the rows of commits 3b60a07, 81a41d4 and 0245d56,
with the code that ran them.

    python -m experiments.probe_decode            # -> results/<GPU>/probe_decode.jsonl
    python -m experiments.probe_decode --points qwen2_57b_a14b:2048,4096 mixtral_8x7b:1024
        # the forward's timeline at other (model, T) points (variants default and no_pdl; PERF_LOG v20)
        # -> results/<GPU>/probe_decode_points.jsonl
"""
from __future__ import annotations

import statistics
import argparse
from dataclasses import replace

import torch

from tritonmoe import _launch, functional
from tritonmoe.specs import get_spec
from . import common
from .impls import IMPLS
from .latency import make_problem

MODELS = ("mixtral_8x7b", "qwen2_57b_a14b", "deepseek_v3")
TOKENS = (1, 2, 4)
REPLAYS = 20
SEED = 0
# per variant: functional.SLOT_SCHEDULE_MAX_TOKENS (None: as shipped) and programmatic dependent launch
# (tritonmoe._launch.PDL, shipped on)
VARIANTS = {"default": (None, True), "no_pdl": (None, False), "built_schedule": (0, True),
            "slot_schedule": (max(TOKENS), True)}


def _short(name: str) -> str:
    for key in ("_router", "_route", "_schedule", "_histogram", "_scan", "_scatter", "_expert_gemm", "_combine",
                "_permute"):
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
    fn = IMPLS["tritonmoe_fused"](replace(p, x=p.x[:T]))
    eager = common.quantiles(common.time_ms(fn, p.x.device, 100, 500))  # the forward as the latency grid times it
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
    print(f"{name} T={T} {variant}: eager {1e3 * eager['ms_p50']:.1f} us, graph span "
          f"{statistics.median(spans):.1f} us: {line}", flush=True)
    return {**prov, **ceilings, "probe": "decode_graph", "variant": variant, "model": name, "T": T,
            "eager_ms": eager,
            "replays": REPLAYS, "span_us_p50": statistics.median(spans), "span_us_min": min(spans),
            "span_us_max": max(spans), "kernels": kernels}


def _points(args: list[str]) -> dict[str, tuple[int, ...]]:
    """``model:T,T ...`` -> {model: (T, ...)}."""
    points = {}
    for arg in args:
        name, _, tokens = arg.partition(":")
        if name not in MODELS or not tokens:
            raise SystemExit(f"--points: expected model:T[,T...] with model in {MODELS}, got {arg!r}")
        try:
            points[name] = tuple(int(t) for t in tokens.split(","))
        except ValueError:
            raise SystemExit(f"--points: token counts must be integers, got {arg!r}") from None
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="+", metavar="MODEL:T,T", help="other (model, T) points, variant default")
    args = parser.parse_args()
    points = _points(args.points) if args.points else {name: TOKENS for name in MODELS}
    variants = {k: VARIANTS[k] for k in ("default", "no_pdl")} if args.points else VARIANTS
    dev = torch.device("cuda")
    prov = common.provenance(dev, SEED)
    ceilings = common.measure_ceilings(dev, 100, 500)
    rows = []
    for name, tokens in points.items():
        spec = get_spec(name)
        p = make_problem(spec, max(tokens), torch.bfloat16, dev, SEED)
        for T in tokens:
            for variant, (max_tokens, pdl) in variants.items():
                shipped = functional.SLOT_SCHEDULE_MAX_TOKENS, _launch.PDL
                if max_tokens is not None:
                    functional.SLOT_SCHEDULE_MAX_TOKENS = max_tokens
                _launch.PDL = pdl
                try:
                    rows.append(_profile(p, name, T, variant, prov, ceilings))
                finally:
                    functional.SLOT_SCHEDULE_MAX_TOKENS, _launch.PDL = shipped
        del p
        torch.cuda.empty_cache()
    name = "probe_decode_points.jsonl" if args.points else "probe_decode.jsonl"
    path = common.REPO / "results" / common.device_name(dev) / name
    common.write_rows(path, rows, ("probe", "model", "T", "variant", "commit"))
    print(f"{len(rows)} rows -> {path.relative_to(common.REPO)}")


if __name__ == "__main__":
    main()
