"""Probe: is Triton 3.6's warp-specialised persistent GEMM the lever for the compute-bound end? (PERF_LOG gap 1b)

tritonmoe's GEMMs are one program per output tile, software-pipelined (``num_stages``), no warp
specialisation: at 512+ rows per expert they reach about 80 % of the GEMM floor on balanced routing
where cuBLAS reaches 90-94 % (PERF_LOG v18). On Hopper the fast GEMMs give loads and MMAs warps of their
own (a producer feeding the tensor cores through shared memory) and keep one program per SM. v11 tried
Triton's warp-specialised loop on the MoE kernel itself and the H100 call did not return. Before porting
the MoE kernel again, this asks the question on a plain dense GEMM, C = A @ B^T with B stored (N, K) as
the experts' weights are, bf16, every tile through TMA:

* ``tile``: one program per output tile (tritonmoe's structure), grouped tile order;
* ``persistent``: one program per SM walking the tiles, the tile and K loops flattened into one
  pipelined loop (``tl.range(flatten=True)``), as ``TileConfig(persistent=True)`` does;
* ``persistent_ws``: the same loop with ``warp_specialize=True`` (Triton 3.6 turns it into producer
  and consumer partitions on sm_90 at num_warps=4, PERF_LOG v11);
* ``cublas``: ``torch.mm`` on the same operands.

And the fused gate+up as tritonmoe computes it (gate_up shape only: C = silu(A Wg^T) * (A Wu^T), F = N / 2
columns out), per tile and persistent:

* ``*_gate_up2``: two dots per K step against the gate and the up weight tiles, sharing the input tile
  (tritonmoe's structure: two accumulators);
* ``*_gate_up_packed``: one dot against a weight tile of 2 BLOCK_N rows, from w13 repacked so that
  each BLOCK_N gate rows are followed by the BLOCK_N up rows of the same columns; the accumulator is
  split into gate and up in the epilogue;
* ``*_gate_up_3d``: the same one dot without repacking: w13 seen as (2, F, K) and a three-dimensional
  TMA box (2, BLOCK_N, BLOCK_K) brings the gate and the up rows of the same columns into one
  shared-memory tile, reshaped to (2 BLOCK_N, BLOCK_K).

And a ladder from the dense persistent one-dot gate+up (cuBLAS's rate, v19) to tritonmoe's MoE kernel, one
difference at a time, on the same dense problem (PERF_LOG v21: the MoE kernel's persistent walk keeps none of
the dense loop's gain, and which of its differences costs it was not measured):

* ``ladder_store``: the dense persistent 3-D-box kernel storing its tile through pointers (masked), not TMA;
* ``ladder_gather``: + input rows loaded through pointers at row indices read from memory (identity), as the
  MoE kernel gathers tokens;
* ``ladder_sched``: + each tile's rows and weight rows looked up in a block table (expert, first row) and the
  expert's end, as the MoE kernel reads its schedule;
* ``moe_tile`` / ``moe_persistent``: ``tritonmoe.gate_up_silu`` itself with every row routed to one expert
  (E = 1, k = 1: the same product), its tiles per program and persistent.

Shapes: the rows of one expert GEMM at the ridge and above (M = 256 ... 8192) against Mixtral's gate+up
(N = 2 x 14336, K = 4096) and down (N = 4096, K = 14336) weights. Each output is checked against
cuBLAS before it is timed; each kernel variant runs in its own child process with a time limit, so a
variant that hangs the GPU costs its limit and is recorded as such, not the call.

    python -m experiments.probe_ws          # -> results/<GPU>/probe_ws.jsonl
    python -m experiments.probe_ws --smoke  # CPU interpreter, tiny shapes: the kernels run, nothing written
    PROBE_KERNELS=cublas,tile_gate_up_3d python -m experiments.probe_ws   # some kernels only
    PROBE_KERNELS=cublas,persistent_gate_up_3d,ladder_store,ladder_gather,ladder_sched,moe_tile,moe_persistent \
        python -m experiments.probe_ws                                     # the ladder
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import common

SHAPES = {"gate_up": (2 * 14336, 4096), "down": (4096, 14336)}   # (N, K): Mixtral-8x7B's expert weights
ROWS = (256, 512, 1024, 2048, 8192)
# (kernel, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): Triton's warp specialisation on sm_90 takes
# num_warps=4 (the consumer) and adds the producer's warps; the other two run the usual 8-warp tiles too.
VARIANTS = [("tile", 128, 256, 64, 8, 3), ("tile", 128, 128, 64, 8, 4), ("persistent", 128, 256, 64, 8, 3),
            ("persistent", 128, 128, 64, 4, 4), ("persistent_ws", 128, 128, 64, 4, 4),
            ("persistent_ws", 128, 256, 64, 4, 3),
            # the fused gate+up (BLOCK_N per accumulator: 2 x 128 = the 128 x 256 tiles above)
            ("tile_gate_up2", 128, 128, 64, 8, 3), ("tile_gate_up_packed", 128, 128, 64, 8, 3),
            ("persistent_gate_up2", 128, 128, 64, 8, 3), ("persistent_gate_up_packed", 128, 128, 64, 8, 3),
            ("tile_gate_up2", 128, 128, 64, 8, 4), ("tile_gate_up_packed", 128, 128, 64, 8, 4),
            ("tile_gate_up_3d", 128, 128, 64, 8, 3), ("persistent_gate_up_3d", 128, 128, 64, 8, 3),
            # the ladder from the dense persistent one-dot gate+up to the MoE kernel (same tiles)
            ("ladder_store", 128, 128, 64, 8, 3), ("ladder_gather", 128, 128, 64, 8, 3),
            ("ladder_sched", 128, 128, 64, 8, 3), ("moe_tile", 128, 128, 64, 8, 3), ("moe_tile", 128, 128, 64, 8, 4),
            ("moe_persistent", 128, 128, 64, 8, 3)]
LADDER_KERNELS = ("ladder_store", "ladder_gather", "ladder_sched")
MOE_KERNELS = ("moe_tile", "moe_persistent")
GATE_UP_KERNELS = ("tile_gate_up2", "tile_gate_up_packed", "tile_gate_up_3d", "persistent_gate_up2",
                   "persistent_gate_up_packed", "persistent_gate_up_3d", *LADDER_KERNELS, *MOE_KERNELS)
GROUP_M = 8
SEED = 0
WARMUP_MS, REP_MS = 25, 200
CHILD_TIMEOUT_S = 120
KEY = ("experiment", "kernel", "config", "gemm", "M", "commit")


@triton.jit
def _tile_pos(tile, num_m, num_n, GROUP: tl.constexpr):
    per_group = GROUP * num_n
    first_m = (tile // per_group) * GROUP
    rows = tl.minimum(num_m - first_m, GROUP)
    return first_m + (tile % per_group) % rows, (tile % per_group) // rows


@triton.jit
def _mm_tile_kernel(a_desc, b_desc, c_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    pid_m, pid_n = _tile_pos(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        acc = tl.dot(a_desc.load([pid_m * BLOCK_M, k]), b_desc.load([pid_n * BLOCK_N, k]).T, acc)
    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_desc.dtype))


@triton.jit
def _mm_persistent_kernel(a_desc, b_desc, c_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                          WARP_SPECIALIZE: tl.constexpr):
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=True,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_pos(tile, num_m, num_n, GROUP)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            acc = tl.dot(a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K]),
                         b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K]).T, acc)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_desc.dtype))


def matmul(a: torch.Tensor, b: torch.Tensor, kernel: str, bm: int, bn: int, bk: int, warps: int,
           stages: int, num_programs: int) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T with one of the probe's kernels."""
    (M, K), N = a.shape, b.shape[0]
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    a_desc, b_desc = TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk])
    c_desc = TensorDescriptor.from_tensor(c, [bm, bn])
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if kernel == "tile":
        _mm_tile_kernel[(tiles,)](a_desc, b_desc, c_desc, M, N, K, bm, bn, bk, GROUP_M, num_warps=warps,
                                  num_stages=stages)
    else:
        grid = min(tiles, num_programs)
        _mm_persistent_kernel[(grid,)](a_desc, b_desc, c_desc, M, N, K, bm, bn, bk, GROUP_M, grid,
                                       kernel == "persistent_ws", num_warps=warps, num_stages=stages)
    return c


@triton.jit
def _gate_up_tile(a_desc, b_desc, c_desc, tile, num_m, num_n, F, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP: tl.constexpr, PACKED: tl.constexpr, BOX3D: tl.constexpr):
    pid_m, pid_n = _tile_pos(tile, num_m, num_n, GROUP)
    if BOX3D:
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            w = tl.reshape(b_desc.load([0, pid_n * BLOCK_N, k]), (2 * BLOCK_N, BLOCK_K))
            acc = tl.dot(a_desc.load([pid_m * BLOCK_M, k]), w.T, acc)
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    elif PACKED:
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            acc = tl.dot(a_desc.load([pid_m * BLOCK_M, k]), b_desc.load([pid_n * 2 * BLOCK_N, k]).T, acc)
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    else:
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k])
            gate = tl.dot(a, b_desc.load([pid_n * BLOCK_N, k]).T, gate)
            up = tl.dot(a, b_desc.load([F + pid_n * BLOCK_N, k]).T, up)
    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], (gate * tl.sigmoid(gate) * up).to(c_desc.dtype))


@triton.jit
def _gate_up_tile_kernel(a_desc, b_desc, c_desc, M, F, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP: tl.constexpr, PACKED: tl.constexpr, BOX3D: tl.constexpr):
    _gate_up_tile(a_desc, b_desc, c_desc, tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(F, BLOCK_N), F, K,
                  BLOCK_M, BLOCK_N, BLOCK_K, GROUP, PACKED, BOX3D)


@triton.jit
def _gate_up_persistent_kernel(a_desc, b_desc, c_desc, M, F, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, GROUP: tl.constexpr, PACKED: tl.constexpr,
                               BOX3D: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(F, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=True):
        _gate_up_tile(a_desc, b_desc, c_desc, tile, num_m, num_n, F, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP, PACKED,
                      BOX3D)


@triton.jit
def _ladder_kernel(a_ptr, a_desc, b_desc, c_ptr, rows_ptr, block_expert_ptr, block_row_ptr, expert_end_ptr, M, F, K,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                   NUM_PROGRAMS: tl.constexpr, GATHER: tl.constexpr, SCHED: tl.constexpr):
    """The persistent 3-D-box gate+up with the tile stored through pointers; GATHER: input rows through pointers
    at indices read from ``rows_ptr``; SCHED: the tile's expert, first row and end looked up as the MoE kernel
    does (block table, then the expert's end)."""
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(F, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_pos(tile, num_m, num_n, GROUP)
        expert, row_start, row_end = 0, pid_m * BLOCK_M, M
        if SCHED:
            expert = tl.load(block_expert_ptr + pid_m)
            row_start = tl.load(block_row_ptr + pid_m)
            row_end = tl.load(expert_end_ptr + expert)
        offs_m = row_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        offs_k = tl.arange(0, BLOCK_K)
        if GATHER:
            a_rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
            a_ptrs = a_ptr + a_rows[:, None] * K + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if GATHER:
                a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
                a_ptrs += BLOCK_K
            else:
                a = a_desc.load([row_start, k])
            w = tl.reshape(b_desc.load([2 * expert, pid_n * BLOCK_N, k]), (2 * BLOCK_N, BLOCK_K))
            acc = tl.dot(a, w.T, acc)
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * F + offs_n[None, :]
        tl.store(c_ptrs, (gate * tl.sigmoid(gate) * up).to(c_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_n < F)[None, :])


def ladder(a: torch.Tensor, w13: torch.Tensor, kernel: str, bm: int, bn: int, bk: int, warps: int, stages: int,
           num_programs: int) -> torch.Tensor:
    """``gate_up`` by the ladder's kernels (``LADDER_KERNELS``): the same product, one MoE difference more each."""
    (M, K), F = a.shape, w13.shape[0] // 2
    c = torch.empty(M, F, dtype=a.dtype, device=a.device)
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(w13.view(2, F, K), [2, bn, bk])
    idx = torch.arange(M, device=a.device, dtype=torch.int32)  # identity rows / one expert's block table
    num_m = triton.cdiv(M, bm)
    block_row = torch.arange(num_m, device=a.device, dtype=torch.int32) * bm
    block_expert = torch.zeros(num_m, device=a.device, dtype=torch.int32)
    expert_end = torch.full((1,), M, device=a.device, dtype=torch.int32)
    grid = min(num_m * triton.cdiv(F, bn), num_programs)
    _ladder_kernel[(grid,)](a, a_desc, b_desc, c, idx, block_expert, block_row, expert_end, M, F, K, bm, bn, bk,
                            GROUP_M, grid, kernel != "ladder_store", kernel == "ladder_sched",
                            num_warps=warps, num_stages=stages)
    return c


def moe_gate_up(a: torch.Tensor, w13: torch.Tensor, kernel: str, bm: int, bn: int, bk: int, warps: int,
                stages: int, sched) -> torch.Tensor:
    """``tritonmoe.gate_up_silu`` with every row routed to one expert (``sched``: E = 1, k = 1): rows in order."""
    import tritonmoe
    tiles = tritonmoe.TileConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, group_m=GROUP_M,
                                 tma=True, persistent=kernel == "moe_persistent")
    return tritonmoe.gate_up_silu(a, w13[None], sched, tiles)


def pack_gate_up(w13: torch.Tensor, block_n: int) -> torch.Tensor:
    """(2F, K) gate rows then up rows -> (2F, K) with each block_n gate rows followed by the same columns' up rows."""
    two_f, K = w13.shape
    F = two_f // 2
    return w13.view(2, F // block_n, block_n, K).transpose(0, 1).reshape(two_f, K).contiguous()


def gate_up(a: torch.Tensor, w13: torch.Tensor, kernel: str, bm: int, bn: int, bk: int, warps: int, stages: int,
            num_programs: int) -> torch.Tensor:
    """silu(a @ w13[:F]^T) * (a @ w13[F:]^T); ``w13`` already packed (``pack_gate_up``) for the packed kernels."""
    (M, K), F = a.shape, w13.shape[0] // 2
    packed, box3d = kernel.endswith("packed"), kernel.endswith("3d")
    c = torch.empty(M, F, dtype=a.dtype, device=a.device)
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    if box3d:
        b_desc = TensorDescriptor.from_tensor(w13.view(2, F, K), [2, bn, bk])
    else:
        b_desc = TensorDescriptor.from_tensor(w13, [2 * bn if packed else bn, bk])
    c_desc = TensorDescriptor.from_tensor(c, [bm, bn])
    tiles = triton.cdiv(M, bm) * triton.cdiv(F, bn)
    if kernel.startswith("tile"):
        _gate_up_tile_kernel[(tiles,)](a_desc, b_desc, c_desc, M, F, K, bm, bn, bk, GROUP_M, packed, box3d,
                                       num_warps=warps, num_stages=stages)
    else:
        grid = min(tiles, num_programs)
        _gate_up_persistent_kernel[(grid,)](a_desc, b_desc, c_desc, M, F, K, bm, bn, bk, GROUP_M, packed, box3d,
                                            grid, num_warps=warps, num_stages=stages)
    return c


def _operands(gemm: str, M: int, dev, dtype, smoke: bool):
    N, K = (256, 128) if smoke else SHAPES[gemm]  # smoke: F = 128, one packed block of gate and up rows
    g = torch.Generator(device=dev).manual_seed(SEED)
    a = torch.randn(M, K, generator=g, device=dev).to(dtype)
    b = (torch.randn(N, K, generator=g, device=dev) / K ** 0.5).to(dtype)
    return a, b


def _tflops(M: int, gemm: str, ms: float) -> float:
    N, K = SHAPES[gemm]
    return 2 * M * N * K / (ms * 1e-3) / 1e12


def child(variant: list, smoke: bool) -> list[dict]:
    """Every shape with one kernel variant (a child process's work): rows without provenance."""
    kernel, bm, bn, bk, warps, stages = variant
    dev, dtype = (torch.device("cpu"), torch.float32) if smoke else (torch.device("cuda"), torch.bfloat16)
    sms = 3 if smoke else torch.cuda.get_device_properties(dev).multi_processor_count
    rows = []
    fused = kernel in GATE_UP_KERNELS
    for gemm in (("gate_up",) if fused else SHAPES):
        for M in ((64,) if smoke else ROWS):
            a, b = _operands(gemm, M, dev, dtype, smoke)
            if fused:
                F = b.shape[0] // 2
                h = a.float() @ b.float().T
                ref = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
                w = pack_gate_up(b, bn) if kernel.endswith("packed") else b
            else:
                ref = (a.float() @ b.float().T)
            out = {"experiment": "probe_ws", "gemm": gemm + ("_silu" if fused else ""), "M": M, "N": b.shape[0],
                   "K": b.shape[1], "kernel": kernel, "config": f"m{bm}n{bn}k{bk}w{warps}s{stages}"}
            if kernel == "cublas":
                fn = lambda: a @ b.T  # noqa: E731
            elif kernel in LADDER_KERNELS:
                fn = lambda: ladder(a, w, kernel, bm, bn, bk, warps, stages, sms)  # noqa: E731
            elif kernel in MOE_KERNELS:
                import tritonmoe
                sched = tritonmoe.build_schedule(torch.zeros(M, 1, dtype=torch.int32, device=dev), 1, bm)
                fn = lambda: moe_gate_up(a, w, kernel, bm, bn, bk, warps, stages, sched)  # noqa: E731
            elif fused:
                fn = lambda: gate_up(a, w, kernel, bm, bn, bk, warps, stages, sms)  # noqa: E731
            else:
                fn = lambda: matmul(a, b, kernel, bm, bn, bk, warps, stages, sms)  # noqa: E731
            try:
                c = fn()
                err = ((c.float() - ref).norm() / ref.norm()).item()
            except Exception as why:  # noqa: BLE001 - e.g. out of shared memory: recorded
                rows.append({**out, "status": "error", "reason": f"{type(why).__name__}: {str(why)[:200]}"})
                continue
            if not err <= 1e-2:
                rows.append({**out, "status": "wrong", "rel_err": err})
                continue
            q = common.quantiles(common.time_ms(fn, dev, WARMUP_MS, REP_MS))
            rows.append({**out, "status": "ok", "rel_err": err, **q,
                         "tflops": None if smoke else _tflops(M, gemm, q["ms_p50"])})
            print(f"  {kernel:26s} {out['config']:16s} {out['gemm']:12s} M={M:5d}: {q['ms_p50']:.3f} ms"
                  + ("" if smoke else f" {rows[-1]['tflops']:.0f} TFLOP/s"), flush=True)
    return rows


def main(smoke: bool = False) -> list[dict]:
    dev = torch.device("cpu") if smoke else torch.device("cuda")
    prov = common.provenance(dev, SEED)
    ceilings = {} if smoke else common.measure_ceilings(dev, 100, 500)
    only = os.environ.get("PROBE_KERNELS")  # e.g. "cublas,tile_gate_up_3d": these kernels' variants only
    variants = [v for v in [["cublas", 0, 0, 0, 0, 0]] + [list(v) for v in VARIANTS]
                if not only or v[0] in only.split(",")]
    progress = common.Progress(len(variants), "kernel variants")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(common.REPO), os.environ.get("PYTHONPATH")])))
    rows = []
    for v in variants:
        cmd = [sys.executable, "-m", "experiments.probe_ws", "--child", json.dumps(v)] + (["--smoke"] if smoke else [])
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            got = [json.loads(ln) for ln in lines]
            print("\n".join(ln for ln in done.stdout.splitlines() if ln.startswith("  ")), flush=True)
            if done.returncode != 0:
                got.append({"experiment": "probe_ws", "kernel": v[0], "config": json.dumps(v), "gemm": "-", "M": 0,
                            "status": "error", "reason": done.stderr[-400:]})
        except subprocess.TimeoutExpired:
            got = [{"experiment": "probe_ws", "kernel": v[0], "config": json.dumps(v), "gemm": "-", "M": 0,
                    "status": "timeout", "reason": f"no result within {CHILD_TIMEOUT_S} s"}]
        rows += [{**prov, **ceilings, **r} for r in got]
        progress.step(f"{v[0]} {v[1:]}: " + ", ".join(sorted({r['status'] for r in got})))
    if not smoke:
        path = common.REPO / "results" / common.device_name(dev) / "probe_ws.jsonl"
        common.write_rows(path, rows, KEY)
    ok = {(r["kernel"], r["config"], r["gemm"], r["M"]): r for r in rows if r["status"] == "ok"}
    kernels = [k for k in ("cublas", "tile", "persistent", "persistent_ws") + GATE_UP_KERNELS
               if any(r["kernel"] == k for r in ok.values())]  # the columns of the kernels that ran
    print(f"\nbest ms per kernel (gate_up_silu: the fused gate+up; its cuBLAS column is the plain gate_up GEMM)")
    print(f"{'gemm':12s} {'M':>5s} " + " ".join(f"{k.replace('_gate_up', '_gu'):>14s}" for k in kernels))
    for gemm in ("gate_up", "down", "gate_up_silu"):
        for M in ((64,) if smoke else ROWS):
            best = [min((r["ms_p50"] for (k, _, g, m), r in ok.items() if k == kern and m == M
                         and (g == gemm or (kern == "cublas" and gemm == "gate_up_silu" and g == "gate_up"))),
                        default=float("nan")) for kern in kernels]
            print(f"{gemm:12s} {M:>5d} " + " ".join(f"{b:>14.3f}" for b in best))
    bad = [r for r in rows if r["status"] != "ok"]
    for r in bad:
        print(f"{r['kernel']} {r['config']} {r['gemm']} M={r['M']}: {r['status']} {r.get('reason', '')[:160]}")
    print(f"{len(rows)} rows" + (" (smoke: not written)" if smoke else " -> results/<GPU>/probe_ws.jsonl"))
    return rows


if __name__ == "__main__":
    if "--child" in sys.argv:
        for row in child(json.loads(sys.argv[sys.argv.index("--child") + 1]), smoke="--smoke" in sys.argv):
            print(json.dumps(row), flush=True)
    else:
        main(smoke="--smoke" in sys.argv[1:])
