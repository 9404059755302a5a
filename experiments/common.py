"""Shared pieces of the experiments: provenance, timing, ceilings, floors, raw-result files."""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

import tritonmoe  # before triton: without a GPU it switches on the interpreter
import triton
import triton.language as tl
from tritonmoe.specs import ModelSpec, get_spec

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------

def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(device: torch.device, seed: int) -> dict:
    """Where and with what a row was measured."""
    info = {
        "device": device_name(device),
        "driver": "none",
        "cuda": torch.version.cuda or "none",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "tritonmoe": tritonmoe.__version__,
        "python": platform.python_version(),
        # A copied tree (the lent GPU machine) names its commit in the environment: its .git,
        # if any, may be a stale snapshot.
        "commit": os.environ.get("TRITONMOE_COMMIT") or _git("rev-parse", "HEAD"),
        "dirty": (os.environ["TRITONMOE_DIRTY"] == "true" if "TRITONMOE_DIRTY" in os.environ
                  else bool(_git("status", "--porcelain", "--untracked-files=no"))),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "l2_flush": L2_FLUSH,  # how time_ms cleared L2 before each timed call (rows before v17: "zero")
    }
    if device.type == "cuda":
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            pass
    return info


def device_name(device: torch.device) -> str:
    """``NVIDIA_H100_80GB_HBM3``-style folder name; ``cpu-interpreter`` without a GPU."""
    if device.type != "cuda":
        return "cpu-interpreter"
    return torch.cuda.get_device_name(device).replace(" ", "_")


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------

# The smoke profile's tiny shapes, for the probes' --smoke runs outside Hydra (one home: the profile's yaml)
SMOKE_SHRINK = OmegaConf.to_container(OmegaConf.load(REPO / "experiments" / "conf" / "profile" / "smoke.yaml").shrink)


def model_spec(name: str, shrink=None) -> ModelSpec:
    """The model's spec, or a tiny copy with the same routing for the smoke profile."""
    spec = get_spec(name)
    if not shrink:
        return spec
    E = min(spec.num_experts, shrink["max_experts"])
    return spec.replace(hidden_size=shrink["hidden_size"], intermediate_size=shrink["intermediate_size"],
                        num_experts=E, top_k=min(spec.top_k, E),
                        shared_intermediate_size=shrink["shared_intermediate_size"] if spec.has_shared_expert else 0)


def floor_terms(spec: ModelSpec, T: int, distinct_experts: int, dtype_bytes: int = 2) -> dict:
    """Bytes that must move (weights of the experts the routing touches, activations in and
    out) and FLOPs that must be done (2 T k 3 H F) by one routed-expert forward."""
    H, F, k = spec.hidden_size, spec.intermediate_size, spec.top_k
    return {
        "bytes": distinct_experts * 3 * H * F * dtype_bytes + 2 * T * H * dtype_bytes,
        "flops": 2 * T * k * 3 * H * F,
    }


def floor_ms(terms: dict, ceilings: dict) -> float:
    """The floor: max(bytes / HBM read bandwidth, FLOPs / bf16 matmul rate), in ms."""
    return max(terms["bytes"] / ceilings["hbm_read_Bps"], terms["flops"] / ceilings["bf16_flops"]) * 1e3


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

# How time_ms clears L2 before each timed call on a GPU (the profile's l2_flush; run.py sets it):
# "zero": triton's do_bench, which writes zeros over 256 MB; the dirty lines it leaves are written back
#   inside the timed call (7.7-9.6 us on an H100), and after it a forward whose host time exceeds its GPU
#   time is timed with host time in the window (PERF_LOG v17, probe_flush);
# "read" (the default since v17's finding): the same loop with a 256 MB read (a sum) instead, which leaves
#   L2 holding clean lines.
L2_FLUSH_KINDS = ("zero", "read")
L2_FLUSH = "read"
_FLUSH_BYTES = 256 * 2**20


def time_ms(fn, device: torch.device, warmup_ms: float, rep_ms: float) -> list[float]:
    """Per-call times in ms: device events on a GPU, L2 cleared before each call as ``L2_FLUSH`` says;
    host clock on the CPU interpreter."""
    if L2_FLUSH not in L2_FLUSH_KINDS:
        raise ValueError(f"l2_flush must be one of {L2_FLUSH_KINDS}, got {L2_FLUSH!r}")
    if device.type == "cuda":
        if L2_FLUSH == "zero":
            return list(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all"))
        return _time_read_flush(fn, device, warmup_ms, rep_ms)
    fn()
    t0 = time.perf_counter()
    fn()
    return [(time.perf_counter() - t0) * 1e3]


@functools.lru_cache(maxsize=None)
def _flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.ones(_FLUSH_BYTES // 4, dtype=torch.int32, device=device)


def _time_read_flush(fn, device: torch.device, warmup_ms: float, rep_ms: float) -> list[float]:
    """do_bench's loop (estimate from 5 calls, warm-up, then calls queued back to back between events,
    one wait at the end) with a 256 MB read before each call instead of a 256 MB write."""
    buf = _flush_buffer(device)
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        buf.sum()
        fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate = start.elapsed_time(end) / 5
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(max(1, int(rep_ms / estimate)))]
    for s, e in events:
        buf.sum()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in events]


def time_round_robin(fns: dict, device: torch.device, rounds: int, seed: int = 0) -> dict:
    """name -> per-call times in ms of each of ``fns`` (name -> callable), the calls taking turns: an untimed round
    first, then ``rounds`` rounds that time each once, in a fresh seeded order, L2 cleared before each call (the
    read flush on a GPU). A drift of the GPU's clock over the run (its power cap at the compute-bound end: PERF_LOG
    v16, v26) then falls on every callable alike, where timing them one after another lets each meet its own."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(fns)
    times = {name: [] for name in names}
    order = random.Random(seed)
    cuda = device.type == "cuda"
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        order.shuffle(names)
        if cuda:
            events = []
            for name in names:
                _flush_buffer(device).sum()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                events.append((name, start, end))
            torch.cuda.synchronize(device)
            for name, start, end in events:
                times[name].append(start.elapsed_time(end))
        else:
            for name in names:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def capture_graph(fn):
    """(graph, output): ``fn`` captured once in a CUDA graph after warm-up calls on a side stream;
    each ``graph.replay()`` recomputes ``output`` in place from the captured inputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_graph_ms(fn, device: torch.device, warmup_ms: float, rep_ms: float) -> list[float]:
    """The same call captured once in a CUDA graph and timed as replays."""
    graph, _ = capture_graph(fn)
    return time_ms(graph.replay, device, warmup_ms, rep_ms)


def quantiles(times: list[float]) -> dict:
    if len(times) == 1:
        return {"ms_p20": times[0], "ms_p50": times[0], "ms_p80": times[0], "repeats": 1}
    q = statistics.quantiles(times, n=10)
    return {"ms_p20": q[1], "ms_p50": statistics.median(times), "ms_p80": q[7], "repeats": len(times)}


# ---------------------------------------------------------------------------------------------
# Ceilings, measured in the same run
# ---------------------------------------------------------------------------------------------

@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # each program reads ITERS blocks and writes one number: bytes read >> bytes written
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def measure_ceilings(device: torch.device, warmup_ms: float, rep_ms: float) -> dict:
    """HBM read bandwidth (bytes/s, a 4 GiB read) and dense bf16 matmul rate (FLOP/s, 8192^3)."""
    if device.type != "cuda":
        return {"hbm_read_Bps": float("nan"), "bf16_flops": float("nan")}
    n = 1 << 31                                                  # 2^31 bf16 = 4 GiB
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    block, iters = 4096, 8
    grid = (triton.cdiv(n, block * iters),)
    out = torch.empty(grid[0], device=device)
    read_ms = statistics.median(time_ms(lambda: _read_kernel[grid](x, out, n, BLOCK=block, ITERS=iters),
                                        device, warmup_ms, rep_ms))
    del x, out
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = statistics.median(time_ms(lambda: a @ b, device, warmup_ms, rep_ms))
    del a, b
    torch.cuda.empty_cache()
    return {"hbm_read_Bps": n * 2 / (read_ms * 1e-3), "bf16_flops": 2 * 8192 ** 3 / (mm_ms * 1e-3)}


# ---------------------------------------------------------------------------------------------
# Raw result files
# ---------------------------------------------------------------------------------------------

def results_dir(cfg, device: torch.device) -> Path:
    sub = cfg.profile.results_dir or device_name(device)
    return REPO / cfg.results_root / sub  # an absolute results_root stays absolute


def write_rows(path: Path, rows: list[dict], key_fields: tuple[str, ...]) -> None:
    """Replace the rows whose key this run measured again; keep the others; sorted, one JSON a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new_keys = {tuple(r[f] for f in key_fields) for r in rows}
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if tuple(row.get(f) for f in key_fields) not in new_keys:
                    kept.append(row)
    all_rows = sorted(kept + rows, key=lambda r: tuple(str(r.get(f)) for f in key_fields))
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in all_rows))


def save_probe_rows(name: str, device: torch.device, rows: list[dict], key_fields: tuple[str, ...],
                    smoke: bool = False) -> None:
    """A probe's rows into results/<GPU>/<name>.jsonl (``write_rows``), or nowhere for a smoke run; says which."""
    if smoke:
        print(f"{len(rows)} rows (smoke: not written)")
        return
    path = REPO / "results" / device_name(device) / f"{name}.jsonl"
    write_rows(path, rows, key_fields)
    print(f"{len(rows)} rows -> {path.relative_to(REPO)}")


class Progress:
    """One line per step with an ETA, for long sweeps."""

    def __init__(self, total: int, what: str):
        self.total, self.done, self.what, self.start = total, 0, what, time.time()

    def step(self, label: str) -> None:
        self.done += 1
        elapsed = time.time() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total}] {self.what} {label}  elapsed {elapsed:.0f}s, ETA {eta:.0f}s", flush=True)
