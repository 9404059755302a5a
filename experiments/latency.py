"""T1/T2 latency: every implementation, one MoE layer forward (routed experts, the model's
routing), the same inputs and weights, checked against tritonmoe.reference before timing."""
from __future__ import annotations

import dataclasses
import statistics

import torch

from tritonmoe import reference
from . import common
from .impls import IMPLS, Problem, Unavailable

KEY = ("experiment", "model", "dtype", "T", "impl", "mode")
CHECK_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ROUTE_MARGIN = 1e-6


# Tokens are drawn this many at a time (the grid's largest T) and the first T kept: CUDA's generator gives a
# tensor's first rows other values at another size (and moves on by another amount), so drawing T rows made a
# point's tokens and router weight depend on the largest T of the run that measured it (PERF_LOG v21).
TOKEN_ROWS = 8192


def make_problem(spec, T, dtype, device, seed) -> Problem:
    """Random expert weights, router weight, correction bias and T tokens for ``spec``: the same values for a
    given seed whatever T (the first T of ``max(T, TOKEN_ROWS)`` rows)."""
    g = torch.Generator(device=device).manual_seed(seed)
    H, F, E = spec.hidden_size, spec.intermediate_size, spec.num_experts

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    w13 = torch.empty(E, 2 * F, H, device=device, dtype=dtype)
    w2 = torch.empty(E, H, F, device=device, dtype=dtype)
    for e in range(E):  # one expert at a time: no float32 copy of DeepSeek-V3's 22 GB
        w13[e] = randn(2 * F, H, scale=H ** -0.5)
        w2[e] = randn(H, F, scale=F ** -0.5)
    bias = randn(E, scale=0.05).float() if spec.uses_correction_bias else None
    x = randn(max(T, TOKEN_ROWS), H)[:T]
    return Problem(spec, x, randn(E, H, scale=H ** -0.5), bias, w13, w2)


def expected(p: Problem):
    """The float64 reference output and the tokens whose routing is not a float32 near-tie."""
    logits = p.router_logits()
    ref_w, ref_ids = reference.route(logits, p.spec, correction_bias=p.bias)
    ref = reference.fused_experts(p.x, p.w13, p.w2, ref_w, ref_ids)
    clear = reference.selection_margin(logits, p.spec, correction_bias=p.bias) > ROUTE_MARGIN
    return ref, clear


def check(out: torch.Tensor, ref: torch.Tensor, clear: torch.Tensor | None = None) -> float:
    """||out - ref|| / ||ref|| in float64 over the clear tokens (default: all); inf if anything in
    ``out`` is not finite."""
    if not torch.isfinite(out).all():
        return float("inf")
    if clear is not None:
        out, ref = out[clear], ref[clear]
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def num_steps(cfg) -> int:
    return len(list(cfg.profile.get("tokens") or cfg.experiment.tokens)) * len(cfg.experiment.impls)


def run(cfg, spec, device, dtype, seed, prov, ceilings, progress) -> list[dict]:
    rows = []
    impls = list(cfg.experiment.impls)
    tokens = list(cfg.profile.get("tokens") or cfg.experiment.tokens)
    # one set of weights for the whole sweep; the first T rows of the tokens for each T
    big = make_problem(spec, max(tokens), dtype, device, seed)
    for T in tokens:
        p = dataclasses.replace(big, x=big.x[:T])
        weights, ids = reference.route(p.router_logits(), spec, correction_bias=p.bias)
        distinct = int(torch.unique(ids).numel())
        ref = expected(p)  # once per T, shared by every implementation
        terms = common.floor_terms(spec, T, distinct, torch.finfo(dtype).bits // 8)
        floor_ms = common.floor_ms(terms, ceilings)
        for impl in impls:
            modes = ["eager"]
            if device.type == "cuda" and impl.startswith("tritonmoe_fused") and T <= cfg.experiment.cuda_graph_max_tokens:
                modes.append("cuda_graph")
            for mode in modes:
                row = dict(experiment="latency", model=spec.name, dtype=str(dtype).replace("torch.", ""), T=T,
                           impl=impl, mode=mode, distinct_experts=distinct, floor_ms=floor_ms, **terms,
                           **ceilings, **prov)
                row.update(_measure(cfg, p, ref, impl, mode, T, device, dtype, terms, floor_ms))
                rows.append(row)
                progress.step(f"{spec.name} T={T} {impl} {mode}: {row['status']}"
                              + (f" {row['ms_p50']:.3f} ms" if row["status"] == "ok" else ""))
        del p, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _measure(cfg, p, ref, impl, mode, T, device, dtype, terms, floor_ms) -> dict:
    if impl == "torch_loop" and T > cfg.experiment.torch_loop_max_tokens:
        return {"status": "skipped", "reason": f"T > torch_loop_max_tokens={cfg.experiment.torch_loop_max_tokens}"}
    try:
        fn = IMPLS[impl](p)
    except Unavailable as why:
        return {"status": "unavailable", "reason": str(why)}
    with torch.no_grad():
        err = check(fn(), *ref)
        if not err <= CHECK_TOL[dtype]:
            return {"status": "wrong", "rel_err": err, "reason": f"rel_err {err:.3g} > {CHECK_TOL[dtype]}"}
        timer = common.time_graph_ms if mode == "cuda_graph" else common.time_ms
        times = timer(fn, device, cfg.profile.warmup_ms, cfg.profile.rep_ms)
    q = common.quantiles(times)
    seconds = q["ms_p50"] * 1e-3
    return {"status": "ok", "rel_err": err, **q, "spread_ms": q["ms_p80"] - q["ms_p20"],
            "achieved_TBps": terms["bytes"] / seconds / 1e12, "achieved_TFLOPs": terms["flops"] / seconds / 1e12,
            "frac_of_floor": floor_ms / q["ms_p50"]}


def summary(rows: list[dict]) -> str:
    """Median ms per (model, T) and implementation, the floor beside it."""
    impls = sorted({r["impl"] + ("+graph" if r["mode"] == "cuda_graph" else "") for r in rows})
    header = f"{'model':16s} {'T':>5s} {'floor':>7s} " + " ".join(f"{i[:18]:>18s}" for i in impls)
    lines = [header]
    for key in sorted({(r["model"], r["T"]) for r in rows}):
        cells = {r["impl"] + ("+graph" if r["mode"] == "cuda_graph" else ""): r for r in rows
                 if (r["model"], r["T"]) == key}
        floor = statistics.mean(r["floor_ms"] for r in cells.values())
        vals = [f"{cells[i]['ms_p50']:18.3f}" if i in cells and cells[i]["status"] == "ok"
                else f"{(cells[i]['status'] if i in cells else '-'):>18s}" for i in impls]
        lines.append(f"{key[0]:16s} {key[1]:5d} {floor:7.3f} " + " ".join(vals))
    return "\n".join(lines)
