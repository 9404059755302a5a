"""Probe: the ridge (PERF_LOG gaps 1 and 4) -- how close anyone's GEMMs get to the grid's floor where it
is loosest.

The floor of a point is max(bytes / HBM read rate, FLOPs / bf16 matmul rate). An expert's GEMM over M
rows does 2 M N K FLOPs on 2 N K weight bytes: M FLOPs per byte. The H100's balance (its measured bf16
rate over its read rate) is about 240 FLOPs per byte, so where experts average 128-256 rows (T k / E)
the two terms of the floor are close, and a kernel meets the floor only by keeping HBM and the tensor
cores both busy at their full rates at once. The grid's misses at T >= 512 all sit there.

Measured in one process, L2 cleared before each call (``common.time_ms``, the read flush by default):

* ``dense``: cuBLAS ``torch.mm`` (M, K) @ (K, N) for each model's expert shapes (gate+up: N = 2F,
  K = H; down: N = H, K = F), M from 16 to 16384 rows; its floor counts A, B and C.
* per point (model, T), the forward's two GEMMs, each against its share of the grid's floor (bytes:
  the weights of the experts the routing touches, plus the layer's input for the gate+up and its output
  for the down projection, so that the two shares add up to the grid's bytes; FLOPs: 2 T k N K), by
  - ``cublas_bmm@balanced``: ``torch.bmm`` over the E experts with T k / E rows each, inputs already in
    expert order: the vendor's GEMM on the most favourable routing at this point's shapes;
  - ``grouped_mm``: ``torch._grouped_mm`` over the model's routing, inputs already in expert order
    (the GEMMs of the grouped_mm baseline, without its gather, activation and scatter);
  - ``tritonmoe`` and ``tritonmoe@balanced``: ``gate_up_silu`` and the weighted down projection (without
    ``combine``) with the tuned tiles, on the model's routing and on the balanced one, each output
    checked first (the gate+up against the default tiles, the down projection through ``combine``).

    python -m experiments.probe_ridge          # -> results/<GPU>/probe_ridge.jsonl
    python -m experiments.probe_ridge --smoke  # CPU interpreter, tiny shapes: the probe runs, nothing written
"""
from __future__ import annotations

import sys
from dataclasses import asdict, replace

import torch

from tritonmoe import combine
from tritonmoe.configs import get_tiles
from tritonmoe.functional import _schedule_tiles
from tritonmoe.gemm import grouped_gemm
from . import common
from .latency import check, make_problem
from .probe_persistent import _balanced_bench
from .tune import _Bench

# T where the experts average 64 to 1024 rows (T k / E): both sides of the ridge
POINTS = {"mixtral_8x7b": (256, 512, 1024, 2048, 4096), "qwen2_57b_a14b": (512, 1024, 2048, 4096, 8192),
          "deepseek_v3": (2048, 4096, 8192)}
DENSE_ROWS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
KEY = ("experiment", "kind", "model", "T", "M", "gemm", "impl", "commit")  # one row per key in the results file
SEED = 0
WARMUP_MS, REP_MS = 25, 200


def _floor(bytes_: float, flops: float, ceilings: dict) -> dict:
    bw_ms = bytes_ / ceilings["hbm_read_Bps"] * 1e3
    mma_ms = flops / ceilings["bf16_flops"] * 1e3
    return {"bytes": bytes_, "flops": flops, "floor_ms": max(bw_ms, mma_ms), "bytes_ms": bw_ms, "flops_ms": mma_ms}


def _timed(fn, dev) -> dict:
    return common.quantiles(common.time_ms(fn, dev, WARMUP_MS, REP_MS))


def _gemm_shapes(spec) -> dict:
    """GEMM -> (N, K) of one expert."""
    return {"gate_up": (2 * spec.intermediate_size, spec.hidden_size),
            "down": (spec.hidden_size, spec.intermediate_size)}


def dense_rows(spec, model, dev, dtype, ceilings, base, rows_list) -> list[dict]:
    out = []
    g = torch.Generator(device=dev).manual_seed(SEED)
    for gemm, (N, K) in _gemm_shapes(spec).items():
        w = torch.randn(N, K, generator=g, device=dev, dtype=torch.float32).to(dtype)
        for M in rows_list:
            a = torch.randn(M, K, generator=g, device=dev, dtype=torch.float32).to(dtype)
            q = _timed(lambda a=a: a @ w.T, dev)
            fl = _floor(2 * (M * K + N * K + M * N), 2 * M * N * K, ceilings)
            out.append({**base, "kind": "dense", "model": model, "T": None, "gemm": gemm, "impl": "cublas_mm", "M": M,
                        "N": N, "K": K, "status": "ok", **fl, **q, "pct_of_floor": 100 * fl["floor_ms"] / q["ms_p50"]})
        del w
    return out


def point_rows(spec, model, T, p, dev, dtype, ceilings, base) -> list[dict]:
    E, k, H, F = spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size
    S = T * k
    bench = _Bench(p, spec, T, dtype, WARMUP_MS, REP_MS)
    balanced = _balanced_bench(p, spec, T, dtype)
    distinct = int(torch.unique(bench.ids).numel())
    weights_bytes = {g: distinct * N * K * p.x.element_size() for g, (N, K) in _gemm_shapes(spec).items()}
    act_bytes = T * H * p.x.element_size()  # the layer's input (gate+up) or output (down), as the grid's floor
    floors = {g: _floor(weights_bytes[g] + act_bytes, 2 * S * N * K, ceilings) for g, (N, K) in _gemm_shapes(spec).items()}
    tuned = get_tiles(T, k, E, F, H, dtype, dev)
    rows = []

    def add(gemm, impl, result, **extra):
        r = {**base, "kind": "point", "model": model, "T": T, "M": None, "gemm": gemm, "impl": impl,
             "rows_per_expert": S / E, "distinct_experts": distinct, **floors[gemm], **result, **extra}
        if r.get("status") == "ok":
            r["pct_of_floor"] = 100 * r["floor_ms"] / r["ms_p50"]
        rows.append(r)

    # cuBLAS over equal experts (balanced routing), inputs in expert order
    g = torch.Generator(device=dev).manual_seed(SEED + T)
    if S % E == 0:
        M = S // E
        x_e = (torch.randn(E, M, H, generator=g, device=dev) * 0.5).to(dtype)
        inter_e = (torch.randn(E, M, F, generator=g, device=dev) * 0.5).to(dtype)
        add("gate_up", "cublas_bmm@balanced", {"status": "ok", **_timed(lambda: torch.bmm(x_e, p.w13.transpose(1, 2)), dev)})
        add("down", "cublas_bmm@balanced", {"status": "ok", **_timed(lambda: torch.bmm(inter_e, p.w2.transpose(1, 2)), dev)})
        del x_e, inter_e
    # torch._grouped_mm over the model's routing, inputs in expert order (bf16 on CUDA only)
    if hasattr(torch, "_grouped_mm") and dev.type == "cuda" and dtype == torch.bfloat16:
        flat = bench.ids.flatten().long()
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
        x_sorted = p.x[torch.argsort(flat, stable=True) // k]
        w13_t, w2_t = p.w13.transpose(1, 2), p.w2.transpose(1, 2)
        add("gate_up", "grouped_mm", {"status": "ok", **_timed(lambda: torch._grouped_mm(x_sorted, w13_t, offs=offs), dev)})
        add("down", "grouped_mm", {"status": "ok",
                                   **_timed(lambda: torch._grouped_mm(bench.inter, w2_t, offs=offs), dev)})
        del x_sorted
    # tritonmoe's GEMMs with the tuned tiles, on the model's routing and on the balanced one
    for impl, b in (("tritonmoe", bench), ("tritonmoe@balanced", balanced)):
        gu = b.measure("gate_up", tuned[0])
        add("gate_up", impl, gu, tiles=asdict(tuned[0]))
        t = _schedule_tiles(tuned[1], "expert_groups")
        sched = b.sched(*t.block_map)
        down = lambda b=b, t=t, sched=sched: grouped_gemm(b.inter, p.w2, sched, t, topk_weights=b.weights)  # noqa: E731
        err = check(combine(down(), k * t.split_k, dtype=dtype), b.expected("down", t.block_m))
        res = {"status": "ok", "rel_err": err, **_timed(down, dev)} if err <= 1e-2 else {"status": "wrong",
                                                                                         "rel_err": err}
        add("down", impl, res, tiles=asdict(tuned[1]),
            padded_rows_frac=int(sched.num_blocks.item()) * t.block_m / S - 1)
    return rows


def main(smoke: bool = False) -> list[dict]:
    dev, dtype = (torch.device("cpu"), torch.float32) if smoke else (torch.device("cuda"), torch.bfloat16)
    points = {"mixtral_8x7b": (32,), "qwen2_57b_a14b": (16,)} if smoke else POINTS
    dense_m = (16, 32) if smoke else DENSE_ROWS
    prov = common.provenance(dev, SEED)
    ceilings = common.measure_ceilings(dev, 100, 500)
    if smoke:  # the interpreter has no ceilings: any positive numbers keep the arithmetic going
        ceilings = {"hbm_read_Bps": 1e9, "bf16_flops": 1e9}
    print(f"ceilings: HBM {ceilings['hbm_read_Bps'] / 1e12:.2f} TB/s, bf16 {ceilings['bf16_flops'] / 1e12:.0f} "
          f"TFLOP/s: balance {ceilings['bf16_flops'] / ceilings['hbm_read_Bps']:.0f} FLOPs per byte", flush=True)
    base = {**prov, **ceilings, "experiment": "probe_ridge"}
    rows = []
    progress = common.Progress(sum(map(len, points.values())) + len(points), "steps")
    for model, tokens in points.items():
        spec = common.model_spec(model, common.SMOKE_SHRINK if smoke else None)
        rows += dense_rows(spec, model, dev, dtype, ceilings, base, dense_m)
        progress.step(f"{model} dense")
        big = make_problem(spec, max(tokens), dtype, dev, SEED)
        for T in tokens:
            rows += point_rows(spec, model, T, replace(big, x=big.x[:T]), dev, dtype, ceilings, base)
            progress.step(f"{model} T={T}")
        del big
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    path = common.REPO / "results" / common.device_name(dev) / "probe_ridge.jsonl"
    assert all(f in r for r in rows for f in KEY), "a row without a key field"  # checked in the smoke run too
    if not smoke:
        common.write_rows(path, rows, KEY)
    print(f"\n{'model':15s} {'T':>5s} {'rows/E':>6s} {'gemm':8s} {'impl':20s} {'ms':>8s} {'floor':>7s} "
          f"{'set by':6s} {'%floor':>6s}")
    for r in rows:
        if r["kind"] != "point":
            continue
        ms = f"{r['ms_p50']:.3f}" if r["status"] == "ok" else r["status"]
        by = "HBM" if r["bytes_ms"] >= r["flops_ms"] else "MMA"
        print(f"{r['model']:15s} {r['T']:>5d} {r['rows_per_expert']:>6.0f} {r['gemm']:8s} {r['impl']:20s} {ms:>8s} "
              f"{r['floor_ms']:>7.3f} {by:6s} {r.get('pct_of_floor', float('nan')):>6.0f}")
    print(f"\ncuBLAS dense GEMM, % of max(bytes, FLOPs) by rows M:")
    for model in points:
        for gemm in ("gate_up", "down"):
            d = [r for r in rows if r["kind"] == "dense" and r["model"] == model and r["gemm"] == gemm]
            print(f"  {model:15s} {gemm:8s} " + " ".join(f"{r['M']}:{r['pct_of_floor']:.0f}" for r in d))
    print(f"{len(rows)} rows" + (" (smoke: not written)" if smoke else f" -> {path.relative_to(common.REPO)}"))
    return rows


if __name__ == "__main__":
    main(smoke="--smoke" in sys.argv[1:])
