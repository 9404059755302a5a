"""Probe: the compute-bound end (PERF_LOG gaps 1 and 4): persistent tiles, 64-row tiles, padding.

Each GEMM kernel program computes one output tile and exits; at large T the kernels reach 60-76 %
of the measured bf16 matmul rate. This times, per (model, T) on the model's real routing and with
each candidate's output checked against the tuned tiles' output first (``tune._Bench``, the tiles
as the forward runs them):

* gate_up: the tuned tiles; + persistent (one program per SM, consecutive tiles' K loops flattened
  into one pipelined loop); + the input copied into expert order first (``permute_input``: TMA
  input tiles instead of a gather); both; 64-row tiles (half the padding of an expert's last block);
* down: the tuned tiles; + persistent; 64-row tiles;
* both with the tuned tiles on a routing that pads nothing (every expert T*k/E rows, a multiple of
  block_m at these points): what the padded rows of the real routing cost;
* the whole forward with the tuned tiles, with the fastest variants per block_m, and the tuned tiles
  again (the drift over the point's measurements).

The share of padded rows (M-blocks x block_m over T*k, minus one) is recorded beside each point:
work the tensor cores do that the floor does not count.

    python -m experiments.probe_persistent          # -> results/<GPU>/probe_persistent.jsonl
    python -m experiments.probe_persistent --smoke  # CPU interpreter, tiny shapes: the probe runs, nothing written
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, replace

import torch

import tritonmoe
from tritonmoe import TileConfig
from tritonmoe.configs import get_tiles
from . import common
from .latency import check, make_problem
from .tune import _Bench

POINTS = {"mixtral_8x7b": (512, 1024, 2048, 8192), "qwen2_57b_a14b": (1024, 2048, 4096),
          "deepseek_v3": (4096, 8192)}
SEED = 0
WARMUP_MS, REP_MS = 25, 200
KEY = ("experiment", "model", "T", "kernel", "variant", "commit")  # one row per key in the results file


def _variants(kernel: str, tuned: TileConfig) -> dict[str, TileConfig]:
    only = os.environ.get("PROBE_VARIANTS", ",".join(DEFAULT_VARIANTS)).split(",")  # e.g. "tuned,persistent"
    return {k: v for k, v in _all_variants(kernel, tuned).items() if k in only}


def _all_variants(kernel: str, tuned: TileConfig) -> dict[str, TileConfig]:
    """Name -> tiles (warp-specialised persistent tiles were tried at 1d9ebac and hung the H100: PERF_LOG v11)."""
    m64 = dict(block_m=64, block_k=64, tma=True, group_m=8, absorb_m=0)  # absorb_m < block_m
    # 256-row tiles (gap 1): an expert of ~256 rows in one M-block, one stream of its weight tiles instead of
    # two or three; the accumulators per thread stay those of the 128-row tiles (gate+up: 256x64 twice)
    m256 = dict(block_m=256, block_k=64, tma=True, group_m=8, num_warps=8, num_stages=3,
                block_n=64 if kernel == "gate_up" else 128)
    tall = {"m256": replace(tuned, **m256, min_block_m=0), "m256_tail16": replace(tuned, **m256, min_block_m=16),
            "m256_tail64": replace(tuned, **m256, min_block_m=64)}
    # absorbed tails: an expert's last whole block also runs up to h rows after it (no block of their own)
    tall.update({f"abs{h}": replace(tuned, absorb_m=h) for h in (16, 32, 64) if h < tuned.block_m})
    # persistent tiles run full-height tiles only (no tails, nothing absorbed); probe_ws found Triton's
    # persistent dense GEMM at cuBLAS's rate with 128x256 tiles, 8 warps, 3 stages (per-tile: 20 % slower)
    full = replace(tuned, persistent=True, min_block_m=0, absorb_m=0, block_m=128, block_k=64, num_warps=8,
                   num_stages=3, block_n=128 if kernel == "gate_up" else 256)
    tall.update({"persistent_s3": full, "persistent_s3_tma": replace(full, tma=True)})
    if kernel == "gate_up":
        tall["persistent_s3_permuted"] = replace(full, tma=True, permute_input=True)
        # the gate+up as two dots sharing the input tile (before v19), and the tuned tiles with TMA weights: one dot
        tall["two_dots"] = replace(tuned, gate_up_one_dot=False)
        tall["tma_one_dot"] = replace(tuned, tma=True, gate_up_one_dot=True)
    if kernel == "gate_up":
        return {"tuned": tuned, "persistent": replace(tuned, persistent=True),
                "permuted": replace(tuned, permute_input=True, tma=True),
                "persistent+permuted": replace(tuned, persistent=True, permute_input=True, tma=True),
                "m64_n128_w4": replace(tuned, **m64, block_n=128, num_warps=4, num_stages=4),
                "m64_n128_w8": replace(tuned, **m64, block_n=128, num_warps=8, num_stages=4),
                "m64_n256_w8": replace(tuned, **m64, block_n=256, num_warps=8, num_stages=3), **tall}
    return {"tuned": tuned, "persistent": replace(tuned, persistent=True),
            "persistent+tma": replace(tuned, persistent=True, tma=True),
            "m64_n128_w4": replace(tuned, **m64, block_n=128, num_warps=4, num_stages=4),
            "m64_n256_w4": replace(tuned, **m64, block_n=256, num_warps=4, num_stages=4),
            "m64_n256_w8": replace(tuned, **m64, block_n=256, num_warps=8, num_stages=4), **tall}


DEFAULT_VARIANTS = ("tuned", "persistent", "permuted", "persistent+permuted", "persistent+tma", "m64_n128_w4",
                    "m64_n128_w8", "m64_n256_w8", "m64_n256_w4")


def _balanced_bench(p, spec, T, dtype):
    """The same problem with every expert given T*k/E rows (token t's choice j -> expert (t*k+j) mod E):
    no expert has a partial M-block when T*k/E is a multiple of block_m, so nothing is padded."""
    bench = _Bench(p, spec, T, dtype, WARMUP_MS, REP_MS)
    slots = torch.arange(T * spec.top_k, device=p.x.device)
    bench.ids = (slots % spec.num_experts).view(T, spec.top_k).to(torch.int32)
    return bench


def _flops(spec, T: int, kernel: str) -> float:
    per_row = 2 * spec.hidden_size * spec.intermediate_size
    return T * spec.top_k * per_row * (2 if kernel == "gate_up" else 1)


def main(smoke: bool = False) -> None:
    dev, dtype = (torch.device("cpu"), torch.float32) if smoke else (torch.device("cuda"), torch.bfloat16)
    points = {m: (8, 40) for m in POINTS} if smoke else POINTS
    if os.environ.get("PROBE_POINTS"):  # e.g. "qwen2_57b_a14b:2048,mixtral_8x7b:1024"
        points = {}
        for item in os.environ["PROBE_POINTS"].split(","):
            model, T = item.split(":")
            points[model] = points.get(model, ()) + (int(T),)
    prov = common.provenance(dev, SEED)
    path = common.REPO / "results" / common.device_name(dev) / "probe_persistent.jsonl"
    ceilings = common.measure_ceilings(dev, 100, 500)
    peak = ceilings["bf16_flops"]
    print(f"ceilings: HBM {ceilings['hbm_read_Bps'] / 1e12:.2f} TB/s, bf16 {peak / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    progress = common.Progress(sum(map(len, points.values())), "points")
    for model, tokens in points.items():
        spec = common.model_spec(model, common.SMOKE_SHRINK if smoke else None)
        big = make_problem(spec, max(tokens), dtype, dev, SEED)
        for T in tokens:
            p = replace(big, x=big.x[:T])
            bench = _Bench(p, spec, T, dtype, WARMUP_MS, REP_MS)
            tuned = get_tiles(T, spec.top_k, spec.num_experts, spec.intermediate_size, spec.hidden_size, dtype, dev)
            sched = bench.sched(tuned[0].block_m)
            padded = int(sched.num_blocks.item()) * sched.block_m / (T * spec.top_k) - 1
            base = {**prov, **ceilings, "experiment": "probe_persistent", "model": model, "T": T,
                    "padded_rows_frac": padded}
            best = {}  # (kernel, block_m) -> (tiles, ms, name)

            def record(r, kernel, name, t):
                if r["status"] == "ok":
                    r["TFLOPs"] = _flops(spec, T, kernel) / r["ms_p50"] / 1e9
                    r["pct_of_peak"] = 100 * r["TFLOPs"] * 1e12 / peak
                rows.append(r)
                print(f"  {model} T={T} {kernel} {name}: " + (f"{r['ms_p50']:.3f} ms, {r['pct_of_peak']:.0f} % of peak"
                      if r["status"] == "ok" else f"{r['status']} {r.get('reason', r.get('rel_err'))}"), flush=True)

            for i, kernel in enumerate(("gate_up", "down")):
                for name, t in _variants(kernel, tuned[i]).items():
                    r = {**base, "kernel": kernel, "variant": name, "tiles": asdict(t), **bench.measure(kernel, t)}
                    record(r, kernel, name, t)
                    key = (kernel, t.block_m)
                    if r["status"] == "ok" and (key not in best or r["ms_p50"] < best[key][1]):
                        best[key] = (t, r["ms_p50"], name)
            # the tuned tiles on routing that pads nothing (when T*k/E is a multiple of block_m)
            balanced = _balanced_bench(p, spec, T, dtype)
            for i, kernel in enumerate(("gate_up", "down")):
                # the tuned tiles and the fastest persistent variant, where one ran: each without padding
                on_balanced = [("tuned", tuned[i])]
                pers = [b for (kk, _), b in best.items() if kk == kernel and b[0].persistent]  # (tiles, ms, name)
                if pers:
                    t, _, name = min(pers, key=lambda b: b[1])
                    on_balanced.append((name, t))
                for name, t in on_balanced:
                    r = {**base, "kernel": kernel, "variant": f"{name}@balanced", "tiles": asdict(t),
                         "padded_rows_frac": int(balanced.sched(t.block_m).num_blocks.item()) * t.block_m
                         / (T * spec.top_k) - 1, **balanced.measure(kernel, t)}
                    record(r, kernel, f"{name}@balanced", t)
            # the whole forward (routing included): tuned tiles, the fastest variants per block_m, tuned again
            w, ids = tritonmoe.route(p.router_logits(), spec, correction_bias=p.bias)
            forward = {"tuned": (tuned, None)}
            for bm in sorted({bm for _, bm in best}):
                if ("gate_up", bm) in best and ("down", bm) in best:
                    gu, dn = best[("gate_up", bm)], best[("down", bm)]
                    forward[f"best_m{bm}"] = ((gu[0], dn[0]), [gu[2], dn[2]])
            forward["tuned_again"] = (tuned, None)  # drift over the point's measurements
            expect = tritonmoe.fused_experts(p.x, p.w13, p.w2, w, ids, tiles=tuned)
            for name, (tiles, choice) in forward.items():
                fn = lambda tiles=tiles: tritonmoe.fused_experts(p.x, p.w13, p.w2, w, ids, tiles=tiles)  # noqa: E731
                err = check(fn(), expect)
                q = common.quantiles(common.time_ms(fn, dev, WARMUP_MS, REP_MS)) if err <= 1e-2 else {}
                rows.append({**base, "kernel": "forward_experts", "variant": name, "rel_err": err,
                             "status": "ok" if q else "wrong", **q, "tiles": [asdict(t) for t in tiles],
                             "choice": choice})
                nan = float("nan")
                print(f"  {model} T={T} forward {name}: {q.get('ms_p50', nan):.3f} ms "
                      f"(p20-p80 {q.get('ms_p20', nan):.3f}-{q.get('ms_p80', nan):.3f}) {choice or ''}", flush=True)
            if not smoke:  # written point by point: a call cut off at its limit keeps what it measured
                common.write_rows(path, rows, KEY)
            progress.step(f"{model} T={T}")
        del big, p, bench
        torch.cuda.empty_cache()
    print(f"\n{'model':15s} {'T':>5s} {'pad':>5s} {'kernel':15s} {'variant':22s} {'ms':>8s} {'TFLOP/s':>8s} "
          f"{'%peak':>6s}")
    for r in rows:
        ms = f"{r['ms_p50']:.3f}" if "ms_p50" in r else r["status"]
        tf = f"{r['TFLOPs']:.0f}" if "TFLOPs" in r else ""
        pk = f"{r['pct_of_peak']:.0f}" if "pct_of_peak" in r else ""
        print(f"{r['model']:15s} {r['T']:>5d} {r['padded_rows_frac']:>5.2f} {r['kernel']:15s} {r['variant']:22s} "
              f"{ms:>8s} {tf:>8s} {pk:>6s}" + (f"  {r.get('reason', '')[:80]}" if r["status"] == "error" else ""))
    print(f"{len(rows)} rows" + (" (smoke: not written)" if smoke else f" -> {path.relative_to(common.REPO)}"))


if __name__ == "__main__":
    main(smoke="--smoke" in sys.argv[1:])
