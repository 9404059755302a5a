"""T3 (issue #5): each stage of the forward on its own, against the two ceilings, and the kernel
launches per forward of every implementation.

Per (model, T), each stage of tritonmoe's fused and unfused pipelines is timed alone on the
inputs the previous stage produced (device events, L2 flushed between calls). Beside each time:
the bytes the stage must move and the FLOPs it must do (counted from the shapes and the
routing), so arithmetic intensity, achieved TB/s and TFLOP/s, and the fraction of each measured
ceiling. Launches: the GPU kernels one forward issues, counted with ``torch.profiler`` (CUDA only).
"""
from __future__ import annotations

import dataclasses

import torch

from tritonmoe import build_schedule, combine, gate_up_silu, grouped_gemm, permute, route, silu_mul
from tritonmoe.configs import get_tiles
from . import common
from .impls import IMPLS, Unavailable
from .latency import make_problem

KEY = ("experiment", "model", "dtype", "T", "pipeline", "stage")


N_STAGES = 10  # entries of stage_plan


def num_steps(cfg) -> int:
    return len(_tokens(cfg)) * (N_STAGES + len(cfg.experiment.launch_impls))


def _tokens(cfg):
    return list(cfg.profile.get("tokens") or cfg.experiment.tokens)


def stage_plan(p, T: int):
    """[(pipeline, stage, fn, bytes, flops)] for tritonmoe's stages, each fed its real inputs."""
    spec, x = p.spec, p.x
    E, H, F, k = spec.num_experts, spec.hidden_size, spec.intermediate_size, spec.top_k
    S, el = T * k, x.element_size()
    logits = p.router_logits()
    weights, ids = route(logits, spec, correction_bias=p.bias)
    distinct = int(torch.unique(ids).numel())
    up_t, down_t = get_tiles(T, k, E, F, H, x.dtype, x.device)
    sched = build_schedule(ids, E, *up_t.block_map)
    # the down projection on the block map the forward gives it (its own where its tiles' differs)
    down_sched = sched if down_t.block_map == up_t.block_map else build_schedule(ids, E, *down_t.block_map)
    inter = gate_up_silu(x, p.w13, sched, up_t)
    x_sorted = permute(x, sched)
    gate = grouped_gemm(x_sorted, p.w13, sched, up_t, n_offset=0, n=F)
    up = grouped_gemm(x_sorted, p.w13, sched, up_t, n_offset=F, n=F)
    rows = grouped_gemm(inter, p.w2, down_sched, down_t, topk_weights=weights)
    w_gate_up, w_half = distinct * 2 * F * H * el, distinct * F * H * el
    logit_el = logits.element_size()
    both = "fused+unfused"
    return [
        (both, "router matmul", p.router_logits, T * H * el + E * H * el + T * E * logit_el, 2 * T * H * E),
        (both, "route", lambda: route(logits, spec, correction_bias=p.bias), T * E * logit_el + S * 8, 0),
        (both, "schedule", lambda: build_schedule(ids, E, *up_t.block_map), S * 4 * 3, 0),
        ("fused", "gate+up+SiLU (fused GEMM)", lambda: gate_up_silu(x, p.w13, sched, up_t),
         w_gate_up + S * H * el + S * F * el, 2 * S * 2 * F * H),
        ("unfused", "permute", lambda: permute(x, sched), 2 * S * H * el, 0),
        ("unfused", "gate GEMM", lambda: grouped_gemm(x_sorted, p.w13, sched, up_t, n_offset=0, n=F),
         w_half + S * H * el + S * F * el, 2 * S * F * H),
        ("unfused", "up GEMM", lambda: grouped_gemm(x_sorted, p.w13, sched, up_t, n_offset=F, n=F),
         w_half + S * H * el + S * F * el, 2 * S * F * H),
        ("unfused", "SiLU*up", lambda: silu_mul(gate, up), 3 * S * F * el, 0),
        (both, "down GEMM (weighted)", lambda: grouped_gemm(inter, p.w2, down_sched, down_t, topk_weights=weights),
         w_half + S * F * el + S * H * rows.element_size(), 2 * S * H * F),
        (both, "combine", lambda: combine(rows, k * down_t.split_k, dtype=x.dtype),
         S * H * rows.element_size() + T * H * el, 0),
    ]


def count_launches(fn, device) -> dict:
    """GPU kernels (and memsets/copies) one call issues, from the profiler's device activities."""
    if device.type != "cuda":
        return {"status": "skipped", "reason": "kernel launches are counted on CUDA only"}
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = sum(1 for n in names if n.startswith(("Memcpy", "Memset")))
    return {"status": "ok", "kernels": len(names) - copies, "memcpy_memset": copies}


def run(cfg, spec, device, dtype, seed, prov, ceilings, progress) -> list[dict]:
    rows = []
    tokens = _tokens(cfg)
    big = make_problem(spec, max(tokens), dtype, device, seed)
    for T in tokens:
        p = dataclasses.replace(big, x=big.x[:T])
        base = dict(experiment="stages", model=spec.name, dtype=str(dtype).replace("torch.", ""), T=T, **ceilings,
                    **prov)
        with torch.no_grad():
            plan = stage_plan(p, T)
            assert len(plan) == N_STAGES, "update N_STAGES (the progress count)"
            for pipeline, stage, fn, nbytes, flops in plan:
                q = common.quantiles(common.time_ms(fn, device, cfg.profile.warmup_ms, cfg.profile.rep_ms))
                s = q["ms_p50"] * 1e-3
                rows.append({**base, "pipeline": pipeline, "stage": stage, **q, "bytes": nbytes, "flops": flops,
                             "intensity_flop_per_byte": flops / nbytes, "achieved_TBps": nbytes / s / 1e12,
                             "achieved_TFLOPs": flops / s / 1e12,
                             "frac_of_bandwidth": nbytes / s / ceilings["hbm_read_Bps"],
                             "frac_of_bf16_peak": flops / s / ceilings["bf16_flops"]})
                progress.step(f"T={T} {stage}: {q['ms_p50']:.4f} ms")
            for impl in cfg.experiment.launch_impls:
                try:
                    r = count_launches(IMPLS[impl](p), device)
                except Unavailable as why:
                    r = {"status": "unavailable", "reason": str(why)}
                rows.append({**base, "pipeline": impl, "stage": "launches per forward", **r})
                progress.step(f"T={T} launches {impl}: {r.get('kernels', r['status'])}")
        del p
    return rows


def summary(rows: list[dict]) -> str:
    lines = [f"{'model':15s} {'T':>5s} {'pipeline':18s} {'stage':28s} {'ms':>9s} {'FLOP/B':>8s} {'TB/s':>6s} "
             f"{'TFLOP/s':>8s} {'%BW':>5s} {'%peak':>6s}"]
    for r in rows:
        if r["stage"] == "launches per forward":
            what = f"{r['kernels']} kernels + {r['memcpy_memset']} copies/memsets" if r["status"] == "ok" else r["status"]
            lines.append(f"{r['model']:15s} {r['T']:5d} {r['pipeline']:18s} {'launches per forward':28s} {what}")
        else:
            lines.append(f"{r['model']:15s} {r['T']:5d} {r['pipeline']:18s} {r['stage']:28s} {r['ms_p50']:9.4f} "
                         f"{r['intensity_flop_per_byte']:8.1f} {r['achieved_TBps']:6.2f} {r['achieved_TFLOPs']:8.1f} "
                         f"{100 * r['frac_of_bandwidth']:5.0f} {100 * r['frac_of_bf16_peak']:6.0f}")
    return "\n".join(lines)
