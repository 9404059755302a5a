"""Tile configurations: data, not run-time autotuning.

Tuned tiles live in ``tritonmoe/configs/<device>.json`` (written by the tuning
experiment, which names its source results file). A file maps a problem key
``"E=<E>,N=<N>,K=<K>,dtype=<dtype>"`` to ``{"<T bucket>": {"gate_up": {...}, "down": {...}}}``
for the two GEMMs. The nearest T bucket at or below the call's tokens wins; with no file or no
entry, a heuristic default is used (and said once in the log). A bucket may also carry
``"chunk_tokens": n``: calls in it run as chunks of n tokens (each with its own bucket's tiles),
where a measurement showed that faster (the table's ``sources`` names it).
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._utils import interpreting

__all__ = ["TileConfig", "get_tiles", "get_chunk_tokens", "lookup_tiles", "device_key"]

CONFIG_DIR = Path(__file__).parent / "configs"
log = logging.getLogger("tritonmoe")


# TileConfig's bool fields
FLAGS = ("tma", "expert_groups", "persistent", "permute_input", "gate_up_one_dot", "atomic_combine", "swap_ab",
         "interleave")


@dataclass(frozen=True)
class TileConfig:
    block_m: int = 64        # rows per M-block (the schedule's block map); the two GEMMs may differ
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8         # M-blocks that sweep N together (L2 reuse); expert groups: at least this many
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1         # down projection only: programs sharing one output tile's reduction
    # Tail tiles: an expert's last, partial M-block runs with the smallest tile height (block_m halved,
    # down to this) that holds its rows, so fewer padded rows reach the tensor cores; 0: every block
    # full height. Tuned per bucket: faster where experts average a few blocks, slower at 8192 tokens
    # (PERF_LOG v4, v15). fused_experts(schedule="tail_tiles") uses 16 where this is 0.
    min_block_m: int = 0
    # Absorbed tails: an expert with a whole M-block and at most this many rows after its last one runs
    # them in that block's program, as a second tile against the same weight tiles, instead of in a block
    # of its own that streams the weights again (the schedule is built for it: build_schedule's
    # absorb_m). 0: off; else a power of two in [16, block_m). Where experts average about block_m or
    # 2 * block_m rows, routing puts about half of them a few rows past a whole block.
    absorb_m: int = 0
    # Tiles through Hopper's copy engine (TMA descriptors): the weights, and the input rows where they
    # are contiguous (the down projection's full-height tiles); pointer loads where it cannot serve.
    tma: bool = False
    # Groups of M-blocks that sweep N together never span two experts (fused_experts' default
    # schedule); False: groups of group_m consecutive blocks (schedule="fixed", "tail_tiles").
    expert_groups: bool = True
    # One program per SM walking the used tiles (consecutive tiles' K loops pipelined as one loop);
    # full-height tiles only. Slower than one program per tile on the H100 with two gate+up dots (PERF_LOG
    # v11); with one dot 0-5 % faster where little is padded, slower where much is (v19): a tuned choice.
    persistent: bool = False
    # gate_up only: copy the tokens into expert order first (one more launch, T*k*H elements
    # written and read) so the input tiles go through TMA as well, instead of a gather per tile.
    permute_input: bool = False
    # N-tiles per sweep of the output columns: every M-block (all experts) takes a slice of this many
    # before the next slice starts, so the programs running at once mix experts with many rows
    # (compute-bound tiles) and few (weight-bound ones), e.g. under skewed routing, at the price of
    # reading the input rows once per slice. 0: all of N in one sweep, one group of blocks at a time.
    sweep_n: int = 0
    # gate_up with tma: the gate and up weight tiles of the same columns arrive as one TMA box and meet the
    # input tile in one dot of 2 * block_n columns (split in the epilogue); False: two dots sharing the input
    # tile. A dense gate+up of Mixtral's shape runs 5 % faster per tile with one dot, and as fast as cuBLAS's
    # plain GEMM with one dot and persistent programs (experiments/probe_ws.py, PERF_LOG v19).
    gate_up_one_dot: bool = True
    # down only: the epilogue adds each weighted row into its token's output row with atomic adds (the output
    # zeroed first) instead of writing it at its slot's row for ``combine`` to sum: T*k*H elements neither
    # written nor read back, for T*k*H atomic adds and a zero fill. The k rows of a token then add up in the
    # output dtype in an order that varies from run to run (results not bitwise reproducible). Off in every
    # tuned table: in the forward on the H100, from 1.4 % faster to 4.9 % slower (experiments/PERF_LOG.md v22).
    atomic_combine: bool = False
    # Tiles under 64 rows (tail tiles, or block_m < 64) compute the transposed product, weight columns as the
    # MMA's M and rows as its N: on Hopper tl.dot is a wgmma only where M is 64+, the older mma.sync under it
    # (per-tile paths; not slot schedules, persistent programs or absorbed tails). Off in every tuned table:
    # slower in the forward on the H100 where it changed anything (Mixtral T = 1024: 11 %; PERF_LOG v22).
    swap_ab: bool = False
    # Busy and idle experts side by side: the schedule lays out the M-blocks of experts with more than one
    # before those of experts with one (build_schedule's busy_first), and the programs take the one-block
    # experts' tiles from the list's end spread evenly among the others' from its front. Under skewed routing
    # the GPU then runs busy experts' compute-bound tiles beside one-block experts' weight-bound ones, instead
    # of a stretch of each (PERF_LOG v24). Not with sweep_n.
    interleave: bool = False

    def __post_init__(self):
        for name in FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TileConfig.{name} must be a bool, got {getattr(self, name)!r}")
        zero_means = {"sweep_n": "all of N in one sweep", "min_block_m": "full-height tiles only", "absorb_m": "off"}
        for name, value in asdict(self).items():
            if name in FLAGS:
                continue
            if name in zero_means:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"TileConfig.{name} must be an int >= 0 (0: {zero_means[name]}), got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TileConfig.{name} must be a positive int, got {value!r}")
        for name in ("block_m", "block_n", "block_k", "min_block_m", "absorb_m"):
            value = getattr(self, name)
            if (value < 16 or value & (value - 1)) and not (name in zero_means and value == 0):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {value}")
        if self.absorb_m >= self.block_m:
            raise ValueError(f"TileConfig.absorb_m must be below block_m={self.block_m}, got {self.absorb_m}")
        if self.interleave and self.sweep_n:
            raise ValueError(f"TileConfig.interleave walks the M-blocks from both ends; sweep_n={self.sweep_n} sweeps "
                             f"them in slices of N: set one of them")

    @property
    def walks_blocks(self) -> bool:
        """Whether the GEMMs walk a built schedule's used M-blocks (persistent programs, N sweeps, the interleaved
        walk): such tiles never run on a slot schedule, which has none."""
        return self.persistent or self.sweep_n > 0 or self.interleave

    @property
    def block_map(self) -> tuple[int, int, bool]:
        """(block_m, absorb_m, busy_first): what a schedule's M-block map is built for (``build_schedule``'s
        last three arguments); GEMMs whose tiles differ in it need block maps of their own."""
        return self.block_m, self.absorb_m, self.interleave


def device_key(device: torch.device) -> str:
    """File name stem for a device, e.g. ``NVIDIA_H100_80GB_HBM3``; ``interpreter`` on the CPU."""
    if device.type != "cuda":
        return "interpreter"
    return _cuda_device_key(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_device_key(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_").replace("/", "_")


def problem_key(E: int, N: int, K: int, dtype: torch.dtype) -> str:
    return f"E={E},N={N},K={K},dtype={str(dtype).replace('torch.', '')}"


@functools.lru_cache(maxsize=None)
def _load(device_name: str) -> dict:
    path = CONFIG_DIR / f"{device_name}.json"
    if not path.exists():
        log.info("tritonmoe: no tuned tiles for %s (%s); using defaults", device_name, path)
        return {}
    return json.loads(path.read_text())["configs"]


def _default_block_m(tokens_per_expert: float) -> int:
    # One M-block per expert while experts are small, so each weight tile streams once.
    for bm in (16, 32, 64):
        if tokens_per_expert <= bm:
            return bm
    return 128


def default_tiles(tokens_per_expert: float, interpreter: bool) -> tuple[TileConfig, TileConfig]:
    """(gate_up, down) tiles when nothing tuned applies."""
    if interpreter:
        # The interpreter's cost is per program and per op, not per element: few, small tiles.
        bm = 16 if tokens_per_expert <= 16 else 32
        t = TileConfig(block_m=bm, block_n=32, block_k=32, group_m=4, num_warps=4, num_stages=1)
        return t, t
    bm = _default_block_m(tokens_per_expert)
    warps = 4 if bm <= 64 else 8
    gate_up = TileConfig(block_m=bm, block_n=64 if bm <= 64 else 128, block_k=64, group_m=8, num_warps=warps,
                         num_stages=4 if bm <= 64 else 3)
    down = TileConfig(block_m=bm, block_n=64 if bm <= 32 else 128, block_k=64, group_m=8, num_warps=warps,
                      num_stages=4 if bm <= 64 else 3)
    return gate_up, down


def get_tiles(num_tokens: int, top_k: int, E: int, F: int, H: int, dtype: torch.dtype,
              device: torch.device) -> tuple[TileConfig, TileConfig]:
    """(gate_up, down) tiles for a call (their block_m may differ: each GEMM gets its own block map)."""
    cpu = interpreting() or device.type != "cuda"
    # cached: this runs on every forward, and small-T forwards are bound by host time
    return _tiles(num_tokens, top_k, E, F, H, dtype, "interpreter" if cpu else device_key(device))


def get_chunk_tokens(num_tokens: int, E: int, F: int, H: int, dtype: torch.dtype, device: torch.device) -> int | None:
    """Tokens per chunk for a call of ``num_tokens`` tokens, or None to run it whole (the default)."""
    if interpreting() or device.type != "cuda":
        return None
    return _chunk(num_tokens, E, F, H, dtype, device_key(device))


@functools.lru_cache(maxsize=4096)
def _chunk(num_tokens: int, E: int, F: int, H: int, dtype: torch.dtype, device_name: str) -> int | None:
    bucket = _bucket(_load(device_name).get(problem_key(E, F, H, dtype)), num_tokens)
    return bucket.get("chunk_tokens") if bucket else None


def _bucket(entry: dict | None, num_tokens: int) -> dict | None:
    """The entry's bucket for a call: the largest tuned T at or below num_tokens, else the smallest."""
    if not entry:
        return None
    buckets = sorted(int(m) for m in entry)
    below = [m for m in buckets if m <= num_tokens]
    return entry[str(below[-1] if below else buckets[0])]


def lookup_tiles(device_name: str, num_tokens: int, top_k: int, E: int, F: int, H: int,
                 dtype: torch.dtype) -> tuple[TileConfig, TileConfig]:
    """The tiles a call would get on the device named ``device_name`` (``device_key``, e.g.
    ``NVIDIA_H100_80GB_HBM3``), from any machine: for analysing results measured there."""
    return _tiles(num_tokens, top_k, E, F, H, dtype, device_name)


@functools.lru_cache(maxsize=4096)
def _tiles(num_tokens: int, top_k: int, E: int, F: int, H: int, dtype: torch.dtype, device_name: str):
    table = {} if device_name == "interpreter" else _load(device_name)
    chosen = _bucket(table.get(problem_key(E, F, H, dtype)), num_tokens)
    if chosen:
        return TileConfig(**chosen["gate_up"]), TileConfig(**chosen["down"])
    return default_tiles(num_tokens * top_k / E, device_name == "interpreter")
