"""Probe: the one-block experts' tiles as a second kernel on a second stream (issue #7, PERF_LOG gap 5j).

Under skew, an expert with one M-block of a few rows streams all its weights for those rows: its tiles are
weight-bound, the busy experts' compute-bound. The interleaved walk (v24) mixes the two kinds in one launch, but a
launch's programs all take the same resources: with the kept 128-row tiles one program fills an SM's registers,
so a weight-bound tile holds a whole SM while it waits on HBM. Two launches need not share a shape: the busy
experts' tiles as tuned, per tile, and the one-block experts' as small tiles (few registers, little shared
memory) on a second stream, whose programs may then sit on the same SMs beside the busy tiles and stream their
weights while those compute. Whether they do depends on both kernels' registers and shared memory per SM (the
rows record them); whether it pays is what this times.

Per (E, T) cell and routing (the skew experiment's shapes, tuned tiles and exact routings), each forward checked
against the float64 reference (intermediate and slot rows poisoned first), then all timed in turns
(``common.time_round_robin``):

* ``tuned``: ``fused_experts`` as the skew grid runs it;
* ``split_serial``: both GEMMs as two launches on one stream, the busy experts' blocks (the tuned tiles, per tile,
  not interleaved) then the one-block experts' (``ONE_BLOCK_TILES``), on a busy-first schedule;
* ``split_streams``: the same two launches, the one-block experts' on a second stream;
* ``split_streams_s3``: as ``split_streams``, the busy tiles with 3 pipeline stages (less shared memory);
* ``split_streams_hi``: as ``split_streams``, the second stream of a higher priority (its programs placed first
  where an SM has room);
* ``split_pb``: the one-block experts' tiles as one program per SM walking them (persistent), launched first on the
  second stream, the busy tiles with 3 stages after them: a busy gate+up tile (174 registers x 256 threads, 147 KB)
  fits beside a one-block program (128 x 128, 74 KB) in an SM's 64 K registers and 228 KB, so every SM can hold
  one of each (the down projection's busy tiles, 223 registers, cannot);
* ``split_pb_s4``: as ``split_pb`` with the busy tiles' tuned 4 stages (196 KB: no room beside a one-block
  program; the control);
* ``paired_32``, ``paired_64``, ``paired_32_k64s2`` (gap 5m): one launch, each busy expert's tile and, in
  proportion, a one-block expert's tile of at most 32 (64) rows in the same K loop with its own weight tiles
  (``gemm._launch``'s ``pair_m``), so that the one-block expert's weights stream under the busy tile's MMA inside
  one program; 32-deep K steps and 4 stages (or 64-deep and 2) to hold the second weight tile in shared memory;
  ``unpaired_k32s4``: the same tiles unpaired on the same schedule (the control);
* ``il``, ``il_prefetch_<d>`` (gap 5n): the tuned tiles interleaved, and with each program asking L2 (Hopper's bulk
  prefetch, one weight row per thread, nothing held) for the weights of the one-block expert's tile d tiles
  ahead in the walk, so that the one-block tile's program reads them from L2; GPU only;
* ``split_pb2``, ``split_pb2_s4``: as those, the persistent one-block programs with 2 warps (the 4-warp walk took
  168 registers: 21.5 K per program, which with a busy tile's 45 K passes the SM's 64 K) and launched on the first
  stream, the busy tiles on the second (whose launch waits on an event, so the one-block programs are placed
  first for certain);

and, not forwards, each GEMM of each variant alone on the same intermediate rows, and the busy experts' launches
alone (``busy_*`` columns: the time the one-block experts' tiles would add nothing to).

    python -m experiments.probe_skew_streams            # GPU -> results/<GPU>/probe_skew_streams.jsonl
    python -m experiments.probe_skew_streams --smoke    # CPU interpreter, tiny shapes: it runs, nothing written
    PROBE_SKEWS=0,2.0 PROBE_VARIANTS=tuned,split_pb2 PROBE_ROUNDS=30 python -m experiments.probe_skew_streams 64:2048
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys

import torch

import tritonmoe
from tritonmoe import _launch, build_schedule, gate_up_silu, grouped_gemm, reference
from tritonmoe.functional import _schedule_tiles
from tritonmoe.gemm import ALL_BLOCKS, BUSY_BLOCKS, ONE_BLOCK_EXPERTS, _launch as launch_gemm
from tritonmoe.permute import combine
from . import common
from .latency import CHECK_TOL, check
from .skew import PROBE_SMOKE_CELLS, parse_probe_cells, probe_problem, probe_skews, probe_start, probe_topk_ids
from .tune import tiles_name

CELLS = ((64, 2048), (128, 2048), (128, 8192), (256, 8192))
SKEWS = ("0", "1.0", "2.0", "hot")
# How each split variant runs its two launches (split_tiles' and split_gate_up's arguments); see the docstring.
SPLITS = {
    "split_serial": dict(),
    "split_streams": dict(stream="side"),
    "split_streams_s3": dict(stream="side", busy_stages=3),
    "split_streams_hi": dict(stream="side_hi"),
    "split_pb": dict(stream="side", busy_stages=3, persistent_one=True),
    "split_pb_s4": dict(stream="side", persistent_one=True),
    "split_pb2": dict(stream="side", busy_stages=3, persistent_one=True, one_warps=2, one_first_here=True),
    "split_pb2_s4": dict(stream="side", persistent_one=True, one_warps=2, one_first_here=True),
}
# Paired tiles (one launch: gemm._launch's pair_m), with the tile fields the pair needs changed from the tuned tiles
# (a second weight tile per stage: 32-deep K steps keep 4 stages in shared memory); pair_m 0 is their control.
PAIRED = {
    "paired_32": dict(pair_m=32, block_k=32, num_stages=4),
    "paired_64": dict(pair_m=64, block_k=32, num_stages=4),
    "paired_32_k64s2": dict(pair_m=32, num_stages=2),
    "unpaired_k32s4": dict(pair_m=0, block_k=32, num_stages=4),
}
# The tuned tiles interleaved (as the skew grid runs them at E = 64, T = 2048 and E = 256, T = 8192), each program
# asking L2 for the weights of the one-block expert's tile this many tiles ahead in the walk (gemm._launch's
# prefetch; 0: the control). GPU only (the prefetch is PTX).
PREFETCHED = {"il": 0, "il_prefetch_64": 64, "il_prefetch_192": 192, "il_prefetch_512": 512}
VARIANTS = ("tuned", *SPLITS, *PAIRED, *PREFETCHED)
BLOCK_NAMES = {ALL_BLOCKS: "all blocks", BUSY_BLOCKS: "busy experts", ONE_BLOCK_EXPERTS: "one-block experts"}


def probe_variants(smoke: bool = False) -> tuple[str, ...]:
    """The variants a run times: ``PROBE_VARIANTS`` (comma-separated), else all of ``VARIANTS`` (on the CPU
    interpreter less the L2 prefetches)."""
    default = VARIANTS if not smoke else tuple(v for v in VARIANTS if not PREFETCHED.get(v))
    chosen = tuple(v.strip() for v in os.environ.get("PROBE_VARIANTS", ",".join(default)).split(","))
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"probe_skew_streams: unknown variants {unknown} (PROBE_VARIANTS; known: {VARIANTS})")
    return chosen
SEED = 0
ROUNDS = 15  # rounds of common.time_round_robin on the GPU (PROBE_ROUNDS)
KEY = ("experiment", "E", "T", "skew", "variant", "commit")

# The one-block experts' tiles: narrow in N and 4 warps, so that their registers and shared memory fit beside a
# busy tile's on one SM; tail heights down to 16 rows (their blocks hold a few rows). block_m is the schedule's.
ONE_BLOCK_TILES = {
    "gate_up": dict(block_n=32, block_k=64, group_m=1, num_warps=4, num_stages=3, min_block_m=16),
    "down": dict(block_n=64, block_k=64, group_m=1, num_warps=4, num_stages=3, min_block_m=16),
}


def split_tiles(tuned, kernel: str, busy_stages: int | None = None, persistent_one: bool = False,
                one_warps: int | None = None):
    """(busy experts' tiles, one-block experts' tiles) for one GEMM from its tuned tiles: the busy ones per tile
    (not persistent, interleaved or swept: a launch over a part of the blocks walks them in expert groups), with
    ``busy_stages`` pipeline stages if given; the one-block ones ``ONE_BLOCK_TILES[kernel]`` on the same block map,
    with ``persistent_one`` one program per SM walking them, with ``one_warps`` warps if given."""
    busy = dataclasses.replace(tuned, persistent=False, interleave=False, sweep_n=0, expert_groups=True,
                               num_stages=busy_stages or tuned.num_stages)
    one = dataclasses.replace(busy, **ONE_BLOCK_TILES[kernel], persistent=persistent_one)
    one = dataclasses.replace(one, num_warps=one_warps or one.num_warps)
    return busy, one


@contextlib.contextmanager
def _on(stream):
    """Launches inside go to ``stream`` (None: the current one)."""
    if stream is None:
        yield
    else:
        with torch.cuda.stream(stream):
            yield


def split_gate_up(x, w13, sched, busy, one, side=None, out=None, one_first_here=False):
    """The fused gate+up as two launches over a busy-first schedule's blocks: the busy experts' with ``busy`` tiles
    on the current stream, the one-block experts' with ``one`` tiles on ``side`` (None: after them, same stream);
    persistent ``one`` tiles are launched first (their few programs placed at once, the busy tiles' beside them),
    with ``one_first_here`` on the current stream and the busy tiles on ``side``."""
    F = w13.shape[1] // 2
    if out is None:
        out = torch.empty(sched.num_tokens * sched.top_k, F, dtype=x.dtype, device=x.device)
    kw = dict(n=F, n_offset=0, up_offset=F, gather_a=True, gate_up_silu=True, topk_weights=None)
    _two_launches(x, w13, out, sched, busy, one, side, kw, one_first_here)
    return out


def split_down(inter, w2, sched, busy, one, weights, side=None, out=None, one_first_here=False):
    """The down projection (weighted rows at their slots, for ``combine``) as ``split_gate_up`` splits the gate+up."""
    if out is None:
        out = torch.empty(sched.num_tokens * sched.top_k, w2.shape[1], dtype=inter.dtype, device=inter.device)
    kw = dict(n=w2.shape[1], n_offset=0, up_offset=0, gather_a=False, gate_up_silu=False, topk_weights=weights)
    _two_launches(inter, w2, out, sched, busy, one, side, kw, one_first_here)
    return out


def _two_launches(a, w, out, sched, busy, one, side, kw, one_first_here=False):
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())  # the schedule and the input are the current stream's
    if one_first_here:  # the second stream's launch waits on an event: this one is surely placed first
        launch_gemm(a, w, out, sched, one, blocks=ONE_BLOCK_EXPERTS, **kw)
        with _on(side):
            launch_gemm(a, w, out, sched, busy, blocks=BUSY_BLOCKS, **kw)
    elif one.persistent:  # first: a program per SM, all placed at once; the busy tiles then fill the room left
        with _on(side):
            launch_gemm(a, w, out, sched, one, blocks=ONE_BLOCK_EXPERTS, **kw)
        launch_gemm(a, w, out, sched, busy, blocks=BUSY_BLOCKS, **kw)
    else:  # the busy tiles first: their programs claim the SMs first
        launch_gemm(a, w, out, sched, busy, blocks=BUSY_BLOCKS, **kw)
        with _on(side):
            launch_gemm(a, w, out, sched, one, blocks=ONE_BLOCK_EXPERTS, **kw)
    if side is not None:
        torch.cuda.current_stream().wait_stream(side)
        out.record_stream(side)


def paired_tiles(tuned, block_k: int | None = None, num_stages: int | None = None):
    """A GEMM's tuned tiles for paired tiles: per tile (not persistent, interleaved or swept), expert groups, no
    absorbed tails, TMA weight tiles (the gate+up pairs its one-dot box), with ``block_k`` and ``num_stages`` where
    given."""
    return dataclasses.replace(tuned, persistent=False, interleave=False, sweep_n=0, expert_groups=True, absorb_m=0,
                               tma=True,
                               block_k=block_k or tuned.block_k, num_stages=num_stages or tuned.num_stages)


def gate_up_launch(x, w13, sched, tiles, out=None, **launch):
    """The fused gate+up as one launch with ``gemm._launch``'s probe options (``pair_m``, ``prefetch``)."""
    F = w13.shape[1] // 2
    if out is None:
        out = torch.empty(sched.num_tokens * sched.top_k, F, dtype=x.dtype, device=x.device)
    return launch_gemm(x, w13, out, sched, tiles, n=F, n_offset=0, up_offset=F, gather_a=True, gate_up_silu=True,
                       topk_weights=None, **launch)


def down_launch(inter, w2, sched, tiles, weights, out=None, **launch):
    """The down projection (weighted rows at their slots) as one launch, as ``gate_up_launch``."""
    if out is None:
        out = torch.empty(sched.num_tokens * sched.top_k, w2.shape[1], dtype=inter.dtype, device=inter.device)
    return launch_gemm(inter, w2, out, sched, tiles, n=w2.shape[1], n_offset=0, up_offset=0, gather_a=False,
                       gate_up_silu=False, topk_weights=weights, **launch)


def one_launch_forward(x, w13, w2, weights, ids, tiles, poison=False, **launch):
    """The experts' forward, each GEMM one launch with ``launch`` options (``tiles``: gate+up, down; busy-first
    schedules); ``poison`` as ``split_forward``'s."""
    up, down = tiles
    E, k, S = w13.shape[0], ids.shape[1], ids.numel()
    sched = build_schedule(ids, E, up.block_m, up.absorb_m, True)
    down_sched = sched if down.block_map[:2] == up.block_map[:2] else \
        build_schedule(ids, E, down.block_m, down.absorb_m, True)
    inter = slot_rows = None
    if poison:
        inter = torch.full((S, w13.shape[1] // 2), math.nan, dtype=x.dtype, device=x.device)
        slot_rows = torch.full((S, w2.shape[1]), math.nan, dtype=x.dtype, device=x.device)
    inter = gate_up_launch(x, w13, sched, up, out=inter, **launch)
    slot_rows = down_launch(inter, w2, down_sched, down, weights, out=slot_rows, **launch)
    return combine(slot_rows, k, dtype=x.dtype)


def split_forward(x, w13, w2, weights, ids, tiles, side=None, poison=False, one_first_here=False):
    """The experts' forward with both GEMMs split (``tiles``: ((busy, one) of the gate+up, (busy, one) of the down);
    ``poison``: the intermediate and slot rows NaN first, so that a row neither launch wrote fails the check."""
    (up_busy, up_one), (down_busy, down_one) = tiles
    E, k = w13.shape[0], ids.shape[1]
    sched = build_schedule(ids, E, up_busy.block_m, up_busy.absorb_m, True)
    down_sched = sched if down_busy.block_map[:2] == up_busy.block_map[:2] else \
        build_schedule(ids, E, down_busy.block_m, down_busy.absorb_m, True)
    S = ids.numel()
    inter = slot_rows = None
    if poison:
        inter = torch.full((S, w13.shape[1] // 2), math.nan, dtype=x.dtype, device=x.device)
        slot_rows = torch.full((S, w2.shape[1]), math.nan, dtype=x.dtype, device=x.device)
    inter = split_gate_up(x, w13, sched, up_busy, up_one, side, out=inter, one_first_here=one_first_here)
    slot_rows = split_down(inter, w2, down_sched, down_busy, down_one, weights, side, out=slot_rows,
                           one_first_here=one_first_here)
    return combine(slot_rows, k, dtype=x.dtype)


def _tiles_key(part: str, tiles, blocks=ALL_BLOCKS) -> str:
    """e.g. "gate_up m128n32k64g1w4s3tmatail16 one-block experts" (the tuner's name for the tiles)."""
    return f"{part} {tiles_name(tiles)} {BLOCK_NAMES[blocks]}"


def _call_noting_kernels(cache: dict, key: str, fn):
    """``fn()``; the first time for ``key`` (its tiles), also ``cache[key]``: registers, spills and shared memory per
    program of the kernels that call compiled, from the direct launcher's cache (none under the interpreter)."""
    before = set(_launch._compiled)
    result = fn()
    if key in cache:
        return result
    out = cache[key] = []
    for key in set(_launch._compiled) - before:
        c = _launch._compiled[key]
        out.append({"num_warps": key[2], "num_stages": key[3], "regs": getattr(c, "n_regs", None),
                    "spills": getattr(c, "n_spills", None), "shared": getattr(c.metadata, "shared", None)})
    return result


def main(smoke: bool = False, cells=CELLS) -> list[dict]:
    dev, dtype, base = probe_start(smoke, SEED)
    cells = PROBE_SMOKE_CELLS if smoke else cells
    skews = probe_skews(SKEWS, "probe_skew_streams")
    rounds = 1 if smoke else int(os.environ.get("PROBE_ROUNDS", ROUNDS))
    variants = probe_variants(smoke)
    streams = {None: None, "side": torch.cuda.Stream(dev) if dev.type == "cuda" else None,
               "side_hi": torch.cuda.Stream(dev, priority=-1) if dev.type == "cuda" else None}
    rows, resources = [], {}  # resources: tiles (str) -> what its kernel takes per program
    progress = common.Progress(len(cells) * (len(skews) * len(variants) + 1), "checks and timings")
    for E, T in cells:
        spec, (x, w13, w2, weights), chunk, tuned = probe_problem(E, T, dev, dtype, SEED, smoke)
        H, F, k = spec.hidden_size, spec.intermediate_size, spec.top_k
        up_t, down_t = (_schedule_tiles(t, "expert_groups") for t in tuned)
        timed, fns = {}, {}
        for skew in skews:
            ids = probe_topk_ids(skew, T, k, E, dev, SEED)
            ref = reference.fused_experts(x, w13, w2, weights, ids)
            with torch.no_grad():  # the down projection's input: the tuned gate+up's rows (sorted order, any map)
                inter = _call_noting_kernels(resources, _tiles_key("gate_up", up_t), lambda: gate_up_silu(
                    x, w13, build_schedule(ids, E, *up_t.block_map), up_t))
            for variant in variants:
                row = {**base, "experiment": "probe_skew_streams", "model": spec.name, "E": E, "T": T, "k": k,
                       "H": H, "F": F, "skew": skew, "variant": variant, "chunk_tokens": chunk, "timing": "round_robin",
                       "rounds": rounds}
                if variant == "tuned":
                    def forward(ids=ids):
                        return tritonmoe.fused_experts(x, w13, w2, weights, ids, tiles=tuned, chunk_tokens=chunk)
                    sched = build_schedule(ids, E, *up_t.block_map)
                    down_sched = build_schedule(ids, E, *down_t.block_map)
                    parts = {"gate_up": lambda s=sched: gate_up_silu(x, w13, s, up_t),
                             "down": lambda i=inter, s=down_sched: grouped_gemm(i, w2, s, down_t, topk_weights=weights)}
                    keys = {"gate_up": [_tiles_key("gate_up", up_t)], "down": [_tiles_key("down", down_t)]}
                    with torch.no_grad():
                        _call_noting_kernels(resources, keys["down"][0], parts["down"])
                    row |= {"gate_up_tiles": dataclasses.asdict(up_t), "down_tiles": dataclasses.asdict(down_t)}
                elif variant in PAIRED or variant in PREFETCHED:
                    if variant in PAIRED:
                        how = dict(PAIRED[variant])
                        launch = {"pair_m": how.pop("pair_m")}
                        pt = (paired_tiles(up_t, **how), paired_tiles(down_t, **how))
                        launch["pair_m"] = min(launch["pair_m"], *(t.block_m for t in pt))  # (the smoke run's blocks)
                    else:
                        launch = {"prefetch": PREFETCHED[variant]}
                        pt = tuple(dataclasses.replace(t, interleave=True, sweep_n=0) for t in (up_t, down_t))

                    def forward(ids=ids, pt=pt, launch=launch, poison=False):
                        return one_launch_forward(x, w13, w2, weights, ids, pt, poison, **launch)
                    sched = build_schedule(ids, E, *pt[0].block_map[:2], True)
                    down_sched = build_schedule(ids, E, *pt[1].block_map[:2], True)
                    parts = {"gate_up": lambda s=sched, t=pt[0], kw=launch: gate_up_launch(x, w13, s, t, **kw),
                             "down": lambda i=inter, s=down_sched, t=pt[1], kw=launch:
                                 down_launch(i, w2, s, t, weights, **kw)}
                    keys = {name: [_tiles_key(name, t) + "".join(f" {k}={v}" for k, v in launch.items())]
                            for name, t in zip(parts, pt)}
                    with torch.no_grad():
                        for name, fn in parts.items():
                            _call_noting_kernels(resources, keys[name][0], fn)
                    row |= {"gate_up_tiles": dataclasses.asdict(pt[0]), "down_tiles": dataclasses.asdict(pt[1]),
                            **launch}
                else:
                    how = SPLITS[variant]
                    stream, here = streams[how.get("stream")], how.get("one_first_here", False)
                    tiles = tuple(split_tiles(t, part, how.get("busy_stages"), how.get("persistent_one", False),
                                              how.get("one_warps")) for t, part in ((up_t, "gate_up"), (down_t, "down")))
                    (ub, uo), (db, do) = tiles

                    def forward(ids=ids, tiles=tiles, stream=stream, here=here, poison=False):
                        return split_forward(x, w13, w2, weights, ids, tiles, stream, poison, here)
                    sched = build_schedule(ids, E, ub.block_m, ub.absorb_m, True)
                    down_sched = build_schedule(ids, E, db.block_m, db.absorb_m, True)
                    parts = {"gate_up": lambda s=sched, a=ub, b=uo, st=stream, h=here:
                                 split_gate_up(x, w13, s, a, b, st, one_first_here=h),
                             "down": lambda i=inter, s=down_sched, a=db, b=do, st=stream, h=here:
                                 split_down(i, w2, s, a, b, weights, st, one_first_here=h)}
                    one_launch = {  # each GEMM's launch over one block range alone, into a scratch output
                        "gate_up": lambda t, blocks, s=sched: launch_gemm(
                            x, w13, torch.empty(T * k, F, dtype=dtype, device=dev), s, t, n=F, n_offset=0,
                            up_offset=F, gather_a=True, gate_up_silu=True, topk_weights=None, blocks=blocks),
                        "down": lambda t, blocks, i=inter, s=down_sched: launch_gemm(
                            i, w2, torch.empty(T * k, H, dtype=dtype, device=dev), s, t, n=H, n_offset=0,
                            up_offset=0, gather_a=False, gate_up_silu=False, topk_weights=weights, blocks=blocks)}
                    for name, (busy_t, one_t) in (("gate_up", (ub, uo)), ("down", (db, do))):
                        fns[f"{skew}/busy_only_s{ub.num_stages}/{name}"] = \
                            lambda f=one_launch[name], t=busy_t: f(t, BUSY_BLOCKS)
                        for t, blocks in ((busy_t, BUSY_BLOCKS), (one_t, ONE_BLOCK_EXPERTS)):
                            with torch.no_grad():
                                _call_noting_kernels(resources, _tiles_key(name, t, blocks),
                                                     lambda f=one_launch[name], t=t, b=blocks: f(t, b))
                    keys = {"gate_up": [_tiles_key("gate_up", t, b) for t, b in ((ub, BUSY_BLOCKS),
                                                                                 (uo, ONE_BLOCK_EXPERTS))],
                            "down": [_tiles_key("down", t, b) for t, b in ((db, BUSY_BLOCKS),
                                                                           (do, ONE_BLOCK_EXPERTS))]}
                    row |= {"gate_up_tiles": dataclasses.asdict(ub), "gate_up_one_block_tiles": dataclasses.asdict(uo),
                            "down_tiles": dataclasses.asdict(db), "down_one_block_tiles": dataclasses.asdict(do)}
                with torch.no_grad():
                    out = forward(poison=True) if variant != "tuned" else forward()
                err = check(out, ref)
                if not err <= CHECK_TOL[dtype]:
                    rows.append({**row, "status": "wrong", "rel_err": err})
                    progress.step(f"E={E} T={T} s={skew} {variant}: WRONG ({err:.1e})")
                    continue
                timed[skew, variant] = {**row, "status": "ok", "rel_err": err,
                                        "kernels": {p: [r for key in keys[p] for r in resources[key]]
                                                    for p in parts}}
                fns[f"{skew}/{variant}/forward"] = forward
                for name, fn in parts.items():
                    fns[f"{skew}/{variant}/{name}"] = fn
                progress.step(f"E={E} T={T} s={skew} {variant}: checked ({err:.1e})")
            del ref
        with torch.no_grad():
            times = common.time_round_robin(fns, dev, rounds, SEED)
        for (skew, variant), row in timed.items():
            extra = {f"{part}_{key}": v for part in ("gate_up", "down") if f"{skew}/{variant}/{part}" in times
                     for key, v in common.quantiles(times[f"{skew}/{variant}/{part}"]).items()}
            busy = f"busy_only_s{row['gate_up_tiles']['num_stages']}" if variant != "tuned" else None
            extra |= {f"busy_{part}_{key}": v for part in ("gate_up", "down") if f"{skew}/{busy}/{part}" in times
                      for key, v in common.quantiles(times[f"{skew}/{busy}/{part}"]).items()}
            rows.append({**row, **common.quantiles(times[f"{skew}/{variant}/forward"]), **extra})
        progress.step(f"E={E} T={T}: {len(fns)} callables timed in {rounds} rounds")
        del w13, w2, fns
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    _print(rows, cells, skews, variants)
    print("kernels per program (regs x threads, shared bytes), by tiles:")
    for key, ks in resources.items():
        print(f"  {key}: " + ", ".join(f"{r['regs']} regs x {32 * r['num_warps']}, {r['shared']} B, "
                                       f"{r['spills']} spills" for r in ks))
    common.save_probe_rows("probe_skew_streams", dev, rows, KEY, smoke)
    return rows


def _print(rows, cells, skews, variants):
    ok = {(r["E"], r["T"], r["skew"], r["variant"]): r for r in rows if r["status"] == "ok"}
    parts = ("ms_p50", "gate_up_ms_p50", "down_ms_p50")
    print(f"\n{'E':>4s} {'T':>5s} {'skew':>5s} " + " ".join(f"{v:>20s}" for v in variants)
          + "   (median ms: forward / gate+up / down)")
    for E, T in cells:
        for skew in skews:
            txt = (ok.get((E, T, skew, v), {}) for v in variants)
            print(f"{E:>4d} {T:>5d} {skew:>5s} "
                  + " ".join(f"{'/'.join(f'{c.get(p, math.nan):.3f}' for p in parts):>20s}" for c in txt))
    print("busy experts' launches alone (gate+up / down, ms): "
          + "; ".join(f"E={r['E']} T={r['T']} s={r['skew']} {r['busy_gate_up_ms_p50']:.3f}/{r['busy_down_ms_p50']:.3f}"
                      for r in rows if r["status"] == "ok" and r["variant"] == "split_streams"
                      and "busy_gate_up_ms_p50" in r))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(smoke="--smoke" in args,
         cells=parse_probe_cells([a for a in args if a != "--smoke"], CELLS, "probe_skew_streams"))
