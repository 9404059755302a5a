"""Probe: could the combine be fused into the down projection at the ridge? (PERF_LOG v21, gaps 1 and 4)

At DeepSeek-V3 T = 4096 and 8192 and Qwen2 T = 1024 the target leaves less time after the fastest GEMMs
measured on a balanced routing than the combine alone takes (notebook 03): the down projection writes each
(token, choice) row, weighted, and the combine reads the k rows of a token back and sums them. The one way
around it is to add each row into the token's output from the down projection's epilogue, with atomic adds
into a float32 buffer (zeroed first, cast to bfloat16 after): no rows written or read back, but T*k*H atomic
adds in L2 and two passes over a (T, H) float32 buffer. This times those pieces alone, on the model's routing
(rows in the sorted order the GEMM's tiles hold them, so consecutive rows go to scattered tokens):

* ``combine``: ``tritonmoe.combine`` of (T*k, H) bfloat16 slot rows, as the forward runs it;
* ``rows_write``: writing those (T*k, H) bfloat16 rows (what the down projection's epilogue writes today, here
  alone: the fused epilogue would write none);
* ``atomic_add``: every (sorted row, column) adding a float32 value into its token's row of a (T, H) float32
  buffer with ``tl.atomic_add``, tiles of 64 rows x 256 columns as the down projection's epilogue holds them;
  the values are made in registers (the epilogue has them there), so this is the atomics alone;
* ``zero`` and ``cast``: zeroing the float32 buffer, and casting it to the bfloat16 output.

Each op's output is checked (the atomic buffer must hold k in every element: every token's k rows added 1.0);
times are device events with L2 cleared before each call (``common.time_ms``).

    python -m experiments.probe_combine          # GPU -> results/<GPU>/probe_combine.jsonl
    python -m experiments.probe_combine --smoke  # CPU interpreter, tiny shapes: it runs, nothing written
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

import tritonmoe
from tritonmoe import build_schedule, combine
from . import common
from .latency import check, make_problem

POINTS = {"deepseek_v3": (4096, 8192), "qwen2_57b_a14b": (1024, 2048), "mixtral_8x7b": (512, 1024)}
SEED = 0
WARMUP_MS, REP_MS = 25, 200
BLOCK_M, BLOCK_N = 64, 256          # the down projection's epilogue tile (its tuned tiles hold 64-128 x 256)
KEY = ("experiment", "model", "T", "op", "commit")


@triton.jit
def _atomic_rows_kernel(out_ptr, sorted_slots_ptr, S, H, TOP_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sorted rows [pid_m * BLOCK_M, ...) x columns [pid_n * BLOCK_N, ...): add 1.0 into each row's token's
    row of the float32 output with atomic adds (the values an epilogue would add sit in registers)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < S, offs_n < H
    tokens = tl.load(sorted_slots_ptr + offs_m, mask=mask_m, other=0).to(tl.int64) // TOP_K
    ones = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
    tl.atomic_add(out_ptr + tokens[:, None] * H + offs_n[None, :], ones, mask=mask_m[:, None] & mask_n[None, :],
                  sem="relaxed")


@triton.jit
def _write_rows_kernel(out_ptr, S, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    vals = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * H + offs_n[None, :], vals,
             mask=(offs_m < S)[:, None] & (offs_n < H)[None, :])


def _ops(rows: torch.Tensor, sched, k: int, out32: torch.Tensor, out: torch.Tensor) -> dict:
    """name -> (fn, check of one call's result: True where right), in the order they run: ``zero`` leaves the
    float32 buffer (poisoned with NaN) at 0 for ``atomic_add``'s check (every element k after one call), whose
    timing then grows it; ``cast`` checks the bfloat16 output (poisoned) against the buffer as it stands."""
    S, H = rows.shape
    grid = (triton.cdiv(S, BLOCK_M), triton.cdiv(H, BLOCK_N))
    written = torch.full_like(rows, float("nan"))
    out32.fill_(float("nan"))
    out.fill_(float("nan"))
    expect = rows.view(-1, k, H).double().sum(1)
    return {
        "combine": (lambda: combine(rows, k), lambda got: check(got, expect) <= 1e-2),
        "rows_write": (lambda: _write_rows_kernel[grid](written, S, H, BLOCK_M, BLOCK_N),
                       lambda _: bool((written == 1).all())),
        "zero": (out32.zero_, lambda _: bool((out32 == 0).all())),
        "atomic_add": (lambda: _atomic_rows_kernel[grid](out32, sched.sorted_slots, S, H, k, BLOCK_M, BLOCK_N),
                       lambda _: bool((out32 == k).all())),
        "cast": (lambda: out.copy_(out32), lambda _: bool((out == out32.to(out.dtype)).all())),
    }


def main(smoke: bool = False) -> list[dict]:
    dev, dtype = (torch.device("cpu"), torch.float32) if smoke else (torch.device("cuda"), torch.bfloat16)
    points = {m: (8,) for m in POINTS} if smoke else POINTS
    prov = common.provenance(dev, SEED)
    ceilings = {} if smoke else common.measure_ceilings(dev, 100, 500)
    rows_out = []
    progress = common.Progress(sum(map(len, points.values())), "points")
    for model, tokens in points.items():
        spec = common.model_spec(model, common.SMOKE_SHRINK if smoke else None)
        for T in tokens:
            p = make_problem(spec, T, dtype, dev, SEED)
            w, ids = tritonmoe.route(p.router_logits(), spec, correction_bias=p.bias)
            sched = build_schedule(ids, spec.num_experts, 64)
            k, H = spec.top_k, spec.hidden_size
            g = torch.Generator(device=dev).manual_seed(SEED + T)
            rows = torch.randn(T * k, H, generator=g, device=dev).to(dtype)
            out32 = torch.empty(T, H, dtype=torch.float32, device=dev)
            out = torch.empty(T, H, dtype=dtype, device=dev)
            base = {**prov, **ceilings, "experiment": "probe_combine", "model": model, "T": T, "top_k": k, "H": H,
                    "slot_rows_bytes": T * k * H * rows.element_size(), "out32_bytes": T * H * 4}
            for op, (fn, right) in _ops(rows, sched, k, out32, out).items():
                if not right(fn()):
                    rows_out.append({**base, "op": op, "status": "wrong"})
                    print(f"  {model} T={T} {op}: WRONG", flush=True)
                    continue
                q = common.quantiles(common.time_ms(fn, dev, WARMUP_MS, REP_MS))
                rows_out.append({**base, "op": op, "status": "ok", **q})
                print(f"  {model} T={T} {op}: {1e3 * q['ms_p50']:.1f} us", flush=True)
            del p, rows, out32, out
            progress.step(f"{model} T={T}")
        if not smoke:
            torch.cuda.empty_cache()
    by = {(r["model"], r["T"], r["op"]): r for r in rows_out if r["status"] == "ok"}
    print(f"\n{'model':15s} {'T':>5s} {'combine':>8s} {'rows_write':>10s} {'atomic':>8s} {'zero':>6s} {'cast':>6s} "
          f"{'fused extra':>11s}   (us; fused extra = zero + atomic + cast - rows_write - combine)")
    for model, tokens in points.items():
        for T in tokens:
            us = {op: 1e3 * by[(model, T, op)]["ms_p50"] if (model, T, op) in by else float("nan")
                  for op in ("combine", "rows_write", "atomic_add", "zero", "cast")}
            extra = us["zero"] + us["atomic_add"] + us["cast"] - us["rows_write"] - us["combine"]
            print(f"{model:15s} {T:>5d} {us['combine']:>8.1f} {us['rows_write']:>10.1f} {us['atomic_add']:>8.1f} "
                  f"{us['zero']:>6.1f} {us['cast']:>6.1f} {extra:>11.1f}")
    common.save_probe_rows("probe_combine", dev, rows_out, KEY, smoke)
    return rows_out


if __name__ == "__main__":
    main(smoke="--smoke" in sys.argv[1:])
