"""Probe: does the timer's L2 flush add time to a short forward? (PERF_LOG v17)

``triton.testing.do_bench`` (the grid's timer) clears L2 before each call by writing zeros over 256 MB.
The hypothesis: an H100's L2 (50 MB) is write-back, so those zeros stay in it as dirty lines, and the
timed call's own reads evict them, writing them back to HBM inside the timed window (up to ~16 µs at
3 TB/s, a tenth of a 160 µs decode forward). Measured (17c0986): 7.7–9.6 µs a call where the host keeps
ahead, and far more where it does not (PERF_LOG v17). Here each forward is timed per call between CUDA
events after each of three flushes, taking turns call by call in one process on the same inputs:

* ``zero``: what do_bench does (256 MB of zeros written);
* ``read``: 256 MB read (a sum), which leaves L2 holding clean lines of an unrelated buffer;
* ``zero_read``: the zeros, then the read (the dirty lines written back before the timed call).

Two ways of issuing the calls: ``synced`` (the host waits for each call: the GPU idles between them) and
``queued`` (as do_bench does: the rounds enqueued back to back, one wait at the end, so the host can run
ahead and queue each call's launches behind its flush). The first run (a1c3863,
``probe_flush.a1c3863.jsonl``) timed ``synced`` only.

    python -m experiments.probe_flush          # -> results/<GPU>/probe_flush.jsonl
"""
from __future__ import annotations

import dataclasses

import torch

from tritonmoe.specs import get_spec
from . import common
from .impls import IMPLS, Unavailable
from .latency import make_problem

POINTS = (("qwen2_57b_a14b", (1, 8, 64)), ("mixtral_8x7b", (1, 8)), ("deepseek_v3", (1,)))
IMPLS_TIMED = ("tritonmoe_fused", "torch_grouped_mm", "megablocks")
FLUSHES = ("zero", "read", "zero_read")
WARMUP, ROUNDS, SEED = 10, 200, 0
TIMINGS = ("synced", "queued")
QUEUED_BLOCK = 20  # rounds enqueued per flush kind before the next kind (drift hits the kinds alike)
KEY = ("experiment", "model", "T", "impl", "flush", "timing", "commit")


def main() -> None:
    dev = torch.device("cuda")
    prov = common.provenance(dev, SEED)
    buf = common._flush_buffer(dev)  # the 256 MB the timer's read flush uses (zeroed here too)

    def flush(kind: str) -> None:
        if kind in ("zero", "zero_read"):
            buf.zero_()
        if kind in ("read", "zero_read"):
            buf.sum()

    rows = []
    for name, tokens in POINTS:
        spec = get_spec(name)
        big = make_problem(spec, max(tokens), torch.bfloat16, dev, SEED)
        for T in tokens:
            p = dataclasses.replace(big, x=big.x[:T])
            fns = {}
            for impl in IMPLS_TIMED:
                try:
                    fns[impl] = IMPLS[impl](p)
                except Unavailable as why:
                    print(f"{name} T={T} {impl}: unavailable ({why})")
            times = {(i, f, m): [] for i in fns for f in FLUSHES for m in TIMINGS}
            for r in range(WARMUP + ROUNDS):
                for impl, fn in fns.items():  # every implementation and flush in turn, call by call
                    for kind in FLUSHES:
                        flush(kind)
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        fn()
                        end.record()
                        torch.cuda.synchronize()
                        if r >= WARMUP:
                            times[(impl, kind, "synced")].append(start.elapsed_time(end))
            for b in range(0, WARMUP + ROUNDS, QUEUED_BLOCK):
                for impl, fn in fns.items():
                    for kind in FLUSHES:
                        events = []
                        for _ in range(QUEUED_BLOCK):
                            flush(kind)
                            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            start.record()
                            fn()
                            end.record()
                            events.append((start, end))
                        torch.cuda.synchronize()
                        if b >= WARMUP:
                            times[(impl, kind, "queued")] += [s.elapsed_time(e) for s, e in events]
            for (impl, kind, timing), t in times.items():
                rows.append(dict(experiment="probe_flush", model=name, T=T, impl=impl, flush=kind, timing=timing,
                                 **common.quantiles(t), **prov))
            for timing in TIMINGS:
                print(f"{name} T={T} {timing}: " + ", ".join(
                    f"{impl} " + "/".join(f"{common.quantiles(times[(impl, k, timing)])['ms_p50']:.4f}"
                                          for k in FLUSHES) for impl in fns)
                      + f"  (ms, flush {'/'.join(FLUSHES)})", flush=True)
        del big
        torch.cuda.empty_cache()
    path = common.REPO / "results" / common.device_name(dev) / "probe_flush.jsonl"
    common.write_rows(path, rows, KEY)
    print(f"{len(rows)} rows -> {path.relative_to(common.REPO)}")


if __name__ == "__main__":
    main()
