"""Independent re-measurement of the latency grid (issue #4: the results must hold "when the same grid
is re-measured independently on the same GPU model with a separate harness").

A second harness beside ``experiments/latency.py`` that shares none of its inputs, reference check,
timing or ceilings. Shared, and said so: the Megablocks and grouped_mm adapters of
``experiments/impls.py`` (they define the baselines, not the measurement) and their PyTorch routing,
the issue's byte and FLOP counts (``common.floor_terms``) and the quantiles of a list of times
(``common.quantiles``).

- Inputs: seed 1 (the grid uses 0), drawn here; tritonmoe runs through its public functions
  (``router_logits``, ``route``, ``fused_experts``), the baselines through their adapters with the
  router matmul and routing in PyTorch, as in the grid.
- Check before timing: each implementation's output for the first (up to) 32 tokens against
  ``tritonmoe.reference`` in float64 on the reference's own routing, over the tokens whose routing is
  not a near-tie; relative error at most 1e-2 (bf16).
- Timing: one call between two CUDA events, each call after a 256 MB write that evicts L2; the
  implementations take turns call by call (round robin), so clock and power drift hit them alike;
  5 warm-up rounds, 40 timed rounds; median and p20-p80. Before each call the GPU first sleeps for
  about 1 ms, so a call's launches are queued before its start event fires, as they are when one
  implementation runs back to back (what the grid times); without it, a neighbour that waits for
  the GPU (Megablocks reads its expert counts on the host) left the next call's launches exposed.
- Floor: bytes = the distinct experts the routing touches x 3HF + tokens in and out, FLOPs = 2 T k 3 H F;
  ceilings measured here with PyTorch only: HBM read by ``torch.sum`` over 4 GiB of bf16, the bf16 rate
  by ``torch.mm`` at 8192^3 (the grid uses a Triton read kernel and do_bench).

    python -m experiments.remeasure                # GPU -> results/<GPU>/remeasure.jsonl
    python -m experiments.remeasure --smoke        # CPU interpreter, tiny shapes: it runs, nothing written
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

import tritonmoe
from tritonmoe import reference
from . import common
from .impls import EXPERTS, Problem, Unavailable, torch_route

MODELS = ("mixtral_8x7b", "qwen2_57b_a14b", "deepseek_v3")
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
IMPLS = ("tritonmoe_fused", "megablocks", "torch_grouped_mm")
SEED = 1
WARMUP_ROUNDS, ROUNDS = 5, 40
CHECK_TOKENS, CHECK_TOL, NEAR_TIE = 32, 1e-2, 1e-6
PAD_CYCLES = 2_000_000  # GPU cycles slept before each timed call: about 1 ms at the H100's 1.98 GHz
SMOKE = {"hidden_size": 64, "intermediate_size": 32, "max_experts": 16, "shared_intermediate_size": 48}


def _problem(spec, T: int, dtype, device) -> Problem:
    g = torch.Generator(device=device).manual_seed(SEED)
    H, F, E = spec.hidden_size, spec.intermediate_size, spec.num_experts
    w13 = torch.empty(E, 2 * F, H, device=device, dtype=dtype)
    w2 = torch.empty(E, H, F, device=device, dtype=dtype)
    for e in range(E):  # an expert at a time: no float32 copy of DeepSeek-V3's weights
        w13[e] = (torch.randn(2 * F, H, generator=g, device=device) / H ** 0.5).to(dtype)
        w2[e] = (torch.randn(H, F, generator=g, device=device) / F ** 0.5).to(dtype)
    x = torch.randn(T, H, generator=g, device=device).to(dtype)
    router = (torch.randn(E, H, generator=g, device=device) / H ** 0.5).to(dtype)
    bias = (torch.randn(E, generator=g, device=device) * 0.05) if spec.uses_correction_bias else None
    return Problem(spec, x, router, bias, w13, w2)


def _torch_logits(p: Problem) -> torch.Tensor:
    dtype = torch.float32 if p.spec.router_fp32 else p.x.dtype
    return p.x.to(dtype) @ p.router_weight.to(dtype).T


def _forward(name: str, p: Problem):
    """The whole layer forward (router matmul, routing, experts) of one implementation."""
    if name == "tritonmoe_fused":
        fp32 = p.spec.router_fp32
        return lambda: tritonmoe.fused_experts(p.x, p.w13, p.w2, *tritonmoe.route(
            tritonmoe.router_logits(p.x, p.router_weight, float32=fp32), p.spec, correction_bias=p.bias))
    experts = EXPERTS[name](p)
    return lambda: experts(*torch_route(_torch_logits(p), p.spec, p.bias))


_REFERENCE: dict = {}  # (model, n) -> (float64 output, clear-routing mask) of the first n tokens


def _check(name: str, p: Problem) -> float:
    """Relative error of the first CHECK_TOKENS tokens against the float64 reference (clear routing only)."""
    n = min(CHECK_TOKENS, p.x.shape[0])
    q = Problem(p.spec, p.x[:n], p.router_weight, p.bias, p.w13, p.w2)
    out = _forward(name, q)().double()
    key = (p.spec.name, n)
    if key not in _REFERENCE:
        _REFERENCE.clear()  # one model at a time
        logits = _torch_logits(q)
        w, ids = reference.route(logits, p.spec, correction_bias=p.bias)
        _REFERENCE[key] = (reference.fused_experts(q.x, p.w13, p.w2, w, ids),
                           reference.selection_margin(logits, p.spec, correction_bias=p.bias) > NEAR_TIE)
    ref, clear = _REFERENCE[key]
    if not torch.isfinite(out).all():
        return float("inf")
    diff, ref = out[clear] - ref[clear], ref[clear]
    return (diff.norm() / ref.norm().clamp_min(1e-30)).item()


def _ceilings(device) -> dict:
    if device.type != "cuda":
        return {"hbm_read_Bps": float("nan"), "bf16_flops": float("nan")}
    x = torch.ones(1 << 31, device=device, dtype=torch.bfloat16)        # 4 GiB
    read_ms = _median_ms(lambda: x.sum(dtype=torch.float32), device, flush=False)
    del x
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = _median_ms(lambda: a @ b, device, flush=False)
    del a, b
    torch.cuda.empty_cache()
    return {"hbm_read_Bps": 2 ** 32 / (read_ms * 1e-3), "bf16_flops": 2 * 8192 ** 3 / (mm_ms * 1e-3)}


_FLUSH: dict = {}


def _flush(device) -> None:
    if device.type == "cuda":
        buf = _FLUSH.setdefault(device, torch.empty(256 << 20, dtype=torch.uint8, device=device))
        buf.fill_(1)


def _median_ms(fn, device, flush=True) -> float:
    return statistics.median(_round_robin({"fn": fn}, device, flush)["fn"])


def _round_robin(fns: dict, device, flush=True) -> dict[str, list[float]]:
    """Per implementation, the ms of ROUNDS calls, the implementations taking turns."""
    if device.type != "cuda":  # the interpreter: one call each, host clock (the numbers mean nothing)
        out = {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name] = [(time.perf_counter() - t0) * 1e3]
        return out
    events = {name: [] for name in fns}
    for r in range(WARMUP_ROUNDS + ROUNDS):
        for name, fn in fns.items():
            torch.cuda._sleep(PAD_CYCLES)  # the host enqueues this call's launches meanwhile
            if flush:
                _flush(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            if r >= WARMUP_ROUNDS:
                events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in events.items()}


def _committed(device) -> dict:
    """The grid's eager medians by (model, T, impl), to set the two harnesses side by side."""
    path = common.REPO / "results" / common.device_name(device) / "latency.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {(r["model"], r["T"], r["impl"]): r["ms_p50"] for r in rows
            if r.get("mode") == "eager" and r.get("status") == "ok"}


def main(smoke: bool = False) -> None:
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    tokens = (1, 5) if smoke else TOKENS
    prov = common.provenance(device, SEED)
    ceilings = _ceilings(device)
    committed = _committed(device)
    rows = []
    for model in MODELS:
        spec = common.model_spec(model, SMOKE if smoke else None)
        big = _problem(spec, max(tokens), dtype, device)
        for T in tokens:
            p = Problem(spec, big.x[:T], big.router_weight, big.bias, big.w13, big.w2)
            fns, point = {}, {}
            for name in IMPLS:
                base = {**prov, **ceilings, "experiment": "remeasure", "model": model, "T": T, "impl": name}
                try:
                    err = _check(name, p)
                except Unavailable as why:
                    point[name] = {**base, "status": "unavailable", "reason": str(why)}
                    continue
                point[name] = {**base, "rel_err": err, "status": "ok" if err <= CHECK_TOL else "wrong"}
                if err <= CHECK_TOL:
                    fns[name] = _forward(name, p)
            times = _round_robin(fns, device)
            ids = tritonmoe.route(tritonmoe.router_logits(p.x, p.router_weight, float32=spec.router_fp32), spec,
                                  correction_bias=p.bias)[1]
            terms = common.floor_terms(spec, T, int(torch.unique(ids).numel()))
            floor = max(terms["bytes"] / ceilings["hbm_read_Bps"], terms["flops"] / ceilings["bf16_flops"]) * 1e3
            for name, ms in times.items():
                point[name].update(**common.quantiles(ms), floor_ms=floor, **terms,
                                   grid_ms_p50=committed.get((model, T, name)))
            rows += point.values()
            line = "  ".join(f"{n} {r['ms_p50']:.3f}" if "ms_p50" in r else f"{n} {r['status']}"
                             for n, r in point.items())
            print(f"{model} T={T}: floor {floor:.3f} ms | {line}", flush=True)
        del big, p, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n" + summary(rows))
    path = common.REPO / "results" / common.device_name(device) / "remeasure.jsonl"
    if not smoke:
        common.write_rows(path, rows, ("experiment", "model", "T", "impl", "commit"))
        print(f"{len(rows)} rows -> {path.relative_to(common.REPO)}")


def summary(rows: list[dict]) -> str:
    """Per point: tritonmoe against the faster baseline, % of this harness's floor, and this harness's
    time over the grid's; then the issue's targets as this harness sees them."""
    ok = {(r["model"], r["T"], r["impl"]): r for r in rows if "ms_p50" in r}
    lines = [f"{'model':16s} {'T':>5s} {'fused ms':>9s} {'best base':>9s} {'vs base':>7s} {'% floor':>7s} {'/ grid':>6s}"]
    misses = []
    for model, T in sorted({(m, t) for m, t, _ in ok}, key=lambda mt: (mt[0], mt[1])):
        fused = ok.get((model, T, "tritonmoe_fused"))
        if fused is None:
            continue
        bases = [ok[(model, T, b)]["ms_p50"] for b in ("megablocks", "torch_grouped_mm") if (model, T, b) in ok]
        best = min(bases) if bases else float("nan")
        pct = 100 * fused["floor_ms"] / fused["ms_p50"]
        bw = fused["bytes"] / fused["hbm_read_Bps"] >= fused["flops"] / fused["bf16_flops"]
        grid = fused["grid_ms_p50"]
        lines.append(f"{model:16s} {T:5d} {fused['ms_p50']:9.3f} {best:9.3f} {best / fused['ms_p50']:6.2f}x "
                     f"{pct:6.0f}% {fused['ms_p50'] / grid if grid else float('nan'):6.2f}")
        if bases and fused["ms_p50"] > best:
            misses.append(f"{model} T={T}: slower than the faster baseline ({fused['ms_p50']:.3f} vs {best:.3f} ms)")
        if pct < (85 if bw else 75):
            misses.append(f"{model} T={T}: {pct:.0f}% of the {'bandwidth' if bw else 'compute'} floor")
    return "\n".join(lines + [f"\nPoints that miss a target by this harness ({len(misses)}):"] +
                     [f"- {m}" for m in misses])


if __name__ == "__main__":
    main(smoke="--smoke" in sys.argv[1:])
