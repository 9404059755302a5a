"""Tile tuning: for each T of the grid, time candidate tiles of the two GEMMs on the model's
real shapes and routing, keep the fastest that computes the right thing, and write the
table the package reads (``tritonmoe/configs/<device>.json``).

Per (model, T) and per candidate block_m (the schedule's M-blocks):
1. coarse: every (block_n, block_k, num_warps, tma) of the space at 4 stages;
2. refine around the best: num_stages, group_m, split_k for the down projection, the input copied
   into expert order for the gate+up (``permute_input``), tail tiles (``min_block_m``: an expert's
   last, partial M-block with a smaller tile height), absorbed tails (``absorb_m``: an expert's last
   whole M-block also runs the few rows after it).
The pair kept is the fastest gate+up and down over the block_m candidates; a down projection with
another block map than the gate+up's (block_m, absorb_m, busy_first) pays the build of its own (timed beside it).
3. robust (``experiment.robust_skews``, for the skew experiment's shapes): the fastest few of each
   GEMM and block_m, and tail-tile, N-sweep and absorbed-tail variants of the fastest, are timed again on the skew
   experiment's exact routings (``skew.skewed_topk_ids``: uniform, Zipf(s), one hot expert) as well
   as the model's; the pair kept is the one whose slowest routing is fastest. The package picks tiles
   by shape, never by routing, so the table's tiles must serve every routing a shape meets
   (PERF_LOG v17).
"gate_up" times ``gate_up_silu``; "down" times the weighted down projection plus
``combine`` (so split-K pays for summing its partials), each as the forward runs the tiles
(full-height tiles, expert groups). Every candidate's output is
compared with the default tiles' output first; a mismatch is recorded as "wrong" and never
chosen. Compilation dominates a naive sweep, so a process pool compiles all candidates
into Triton's on-disk cache on a tiny problem of the same specialisation first.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time
from dataclasses import asdict, replace

import torch

import tritonmoe
from tritonmoe import TileConfig, build_schedule, combine, gate_up_silu, grouped_gemm
from tritonmoe import configs
from tritonmoe.configs import CONFIG_DIR, default_tiles, device_key, get_tiles, problem_key
from tritonmoe.functional import SLOT_SCHEDULE_MAX_TOKENS, _schedule_tiles
from tritonmoe.schedule import slot_schedule
from . import common
from .latency import check, make_problem
from .skew import skew_spec, skewed_topk_ids

# "routing": the routing a robust-stage row timed ("model" or a skew); None (or absent, in older rows): the model's
KEY = ("experiment", "model", "dtype", "T", "kernel", "config", "routing")
# Hopper's limit per block: a tile whose epilogue does not fit fails to launch (recorded, never chosen)
SMEM_BYTES = 227 * 1024


def _smem(kernel: str, t: TileConfig, elem: int = 2) -> int:
    b_tiles = 2 if kernel == "gate_up" else 1  # the absorbing branch pipelines its own input tile too
    return t.num_stages * ((t.block_m + t.absorb_m) * t.block_k + b_tiles * t.block_k * t.block_n) * elem


def _fits(kernel: str, t: TileConfig) -> bool:
    # fp32 accumulators per thread: more than ~128 registers of them spills; an absorbing block's second
    # tile (absorb_m rows) adds its own, in its branch only
    per_row = (2 if kernel == "gate_up" else 1) * t.block_n / (32 * t.num_warps)
    accs = per_row * t.block_m
    return _smem(kernel, t) <= SMEM_BYTES and accs <= 128 and accs + per_row * t.absorb_m <= 192


def block_m_candidates(tokens_per_expert: float) -> list[int]:
    """16..128 within 2x of the mean tokens per expert; 64 and 128 (wgmma-sized) once compute-bound,
    where 64-row blocks pad half as many rows (PERF_LOG v11)."""
    if tokens_per_expert >= 128:
        return [64, 128]
    p2 = 1 << max(0, int(-(-tokens_per_expert // 1)) - 1).bit_length()
    return [bm for bm in (16, 32, 64, 128) if p2 // 2 <= bm <= 2 * p2] or [16]


def coarse(kernel: str, block_m: int, space) -> list[TileConfig]:
    out = []
    for bn in space.block_n:
        for bk in space.block_k:
            for w in space.num_warps:
                for tma in space.get("tma", [False]):
                    t = TileConfig(block_m=block_m, block_n=bn, block_k=bk, group_m=8, num_warps=w, num_stages=4,
                                   tma=tma)
                    if not _fits(kernel, t):
                        t = replace(t, num_stages=3)
                    if _fits(kernel, t):
                        out.append(t)
    return out


def refine(kernel: str, best: TileConfig, space, split_useful: bool) -> list[TileConfig]:
    out = [replace(best, num_stages=s) for s in space.num_stages if s != best.num_stages]
    out += [replace(best, group_m=g) for g in space.group_m if g != best.group_m]
    if kernel == "down" and split_useful:
        out += [replace(best, split_k=s) for s in space.split_k if s != best.split_k]
    if kernel == "gate_up" and space.get("permute_input") and not best.permute_input:
        out.append(replace(best, permute_input=True, tma=True))  # TMA input tiles after a copy into expert order
    if not best.min_block_m:
        out += [replace(best, min_block_m=h) for h in space.get("min_block_m", []) if h < best.block_m]
    out += _absorb_variants(best, space.get("absorb_m", []))
    if kernel == "gate_up" and space.get("persistent") and best.block_m >= 64 and not best.persistent:
        out += _persistent_variants(best)
    if space.get("interleave") and best.block_m >= 64 and not best.interleave:
        # one-block experts' tiles among busy experts' (v24): where experts average a block or two, the models'
        # own routing leaves some experts one block and others several
        out.append(replace(best, interleave=True, sweep_n=0))
    return [t for t in out if _fits(kernel, t)]


def _persistent_variants(best: TileConfig) -> list[TileConfig]:
    """One program per SM walking the gate+up's tiles with one dot (TMA weight tiles), full-height tiles only:
    ``best`` so, and at 128 rows the structure that ran at cuBLAS's rate on dense shapes (128 x 2*128 one-dot
    tiles, 8 warps, 3 stages; PERF_LOG v19), which beat the tuned per-tile tiles by 5 % at Qwen2 T = 4096 and
    by 10 % at DeepSeek-V3 T = 8192, whose tuned tiles were pointer-loaded (v21)."""
    full = dict(tma=True, persistent=True, min_block_m=0, absorb_m=0, sweep_n=0)
    out = [replace(best, **full)]
    if best.block_m == 128:
        out.append(replace(best, **full, block_n=128, block_k=64, num_warps=8, num_stages=3))
    return list(dict.fromkeys(out))


def _absorb_variants(t: TileConfig, heights) -> list[TileConfig]:
    """``t`` with absorbed tails of these heights (below its block_m), where it absorbs none yet."""
    return [] if t.absorb_m or t.persistent else [replace(t, absorb_m=h) for h in heights if h < t.block_m]


def all_candidates(spec, tokens, space) -> set[tuple[str, TileConfig]]:
    """Everything coarse() and refine() could ask for: the set the pool precompiles."""
    found = set()
    for T in tokens:
        for bm in block_m_candidates(T * spec.top_k / spec.num_experts):
            for kernel in ("gate_up", "down"):
                for t in coarse(kernel, bm, space):
                    found.add((kernel, t))
                    for r in refine(kernel, t, space, True):
                        found.add((kernel, r))
    return found


# ---------------------------------------------------------------------------------------------
# Precompilation: Triton's disk cache is shared by processes; compiling is per CPU core.
# ---------------------------------------------------------------------------------------------

def _compile_worker(args) -> int:
    items, dtype_name = args
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    dev = torch.device("cuda")
    # same divisibility as the real shapes (multiples of 16), so the same specialisation
    T, E, k, H, F = 64, 8, 2, 256, 256
    x = torch.randn(T, H, device=dev, dtype=dtype)
    w13 = torch.randn(E, 2 * F, H, device=dev, dtype=dtype)
    w2 = torch.randn(E, H, F, device=dev, dtype=dtype)
    ids = torch.randint(0, E, (T, k), device=dev, dtype=torch.int32)
    wts = torch.rand(T, k, device=dev)
    inter = torch.randn(T * k, F, device=dev, dtype=dtype)
    failed = 0
    for kernel, t in items:
        try:
            sched = build_schedule(ids, E, *t.block_map)
            if kernel == "gate_up":
                gate_up_silu(x, w13, sched, t)
            else:
                grouped_gemm(inter, w2, sched, t, topk_weights=wts)
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a config that fails to compile is reported when timed
            failed += 1
    return failed


def precompile(items, dtype: torch.dtype, workers: int) -> None:
    # split_k is a run-time argument: 1 and >1 differ only in the output dtype
    items = sorted({(k, replace(t, split_k=min(t.split_k, 2))) for k, t in items}, key=lambda kt: (kt[0], str(kt[1])))
    chunks = [(items[i::workers], str(dtype).replace("torch.", "")) for i in range(workers)]
    start = time.time()
    print(f"compiling {len(items)} kernel variants in {workers} processes ...", flush=True)
    with mp.get_context("spawn").Pool(workers) as pool:
        failed = sum(pool.map(_compile_worker, chunks))
    print(f"  compiled in {time.time() - start:.0f} s ({failed} failed)", flush=True)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

class _Bench:
    """The two GEMM stages of one (model, T) on fixed inputs, for any tiles."""

    def __init__(self, p, spec, T, dtype, warmup_ms, rep_ms, routing=None):
        """``routing``: (topk_weights, topk_ids) to use instead of the model's routing of ``p``."""
        self.p, self.spec, self.T = p, spec, T
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        if routing is None:
            routing = tritonmoe.route(p.router_logits(), spec, correction_bias=p.bias)
        self.weights, self.ids = routing
        g = torch.Generator(device=p.x.device).manual_seed(T)
        self.inter = (torch.randn(T * spec.top_k, spec.intermediate_size, generator=g, device=p.x.device) * 0.5
                      ).to(dtype)
        self._sched = {}
        self._expected = {}
        self._schedule_ms = {}

    def sched(self, block_m, absorb_m=0, busy_first=False):
        key = (block_m, absorb_m, busy_first)
        if key not in self._sched:
            self._sched[key] = build_schedule(self.ids, self.spec.num_experts, *key)
        return self._sched[key]

    def uses_slots(self, t: TileConfig) -> bool:
        """Whether the forward runs ``t`` on a slot schedule (every slot its own one-row block, no schedule
        built): up to ``SLOT_SCHEDULE_MAX_TOKENS`` tokens, unless the tiles walk a built schedule's blocks
        (``functional._forward``'s rule, there for both GEMMs if either walks: never a candidate at these T,
        since walking tiles need 64+ rows per block; the forward check would catch it)."""
        return self.T <= SLOT_SCHEDULE_MAX_TOKENS and not t.walks_blocks

    def schedule_for(self, t: TileConfig):
        """The schedule the forward runs ``t`` on: a slot schedule (``uses_slots``) or one built for its block map."""
        if self.uses_slots(t):
            if "slots" not in self._sched:
                self._sched["slots"] = slot_schedule(self.ids, self.spec.num_experts)
            return self._sched["slots"]
        return self.sched(*t.block_map)

    def fn(self, kernel, t: TileConfig):
        # the tiles as the forward runs them (expert groups; a slot schedule where the forward uses one)
        t = _schedule_tiles(t, "expert_groups")
        return self._call(kernel, t, self.schedule_for(t))

    def _call(self, kernel, t: TileConfig, s):
        p = self.p
        if kernel == "gate_up":
            return lambda: gate_up_silu(p.x, p.w13, s, t)
        k = self.spec.top_k * t.split_k
        return lambda: combine(grouped_gemm(self.inter, p.w2, s, t, topk_weights=self.weights), k, dtype=p.x.dtype)

    def schedule_ms(self, block_m, absorb_m=0, busy_first=False) -> float:
        """Median time of one more schedule build (the block map of a down projection with its own
        ``TileConfig.block_map``), timed once per block map."""
        key = (block_m, absorb_m, busy_first)
        if key not in self._schedule_ms:
            fn = lambda: build_schedule(self.ids, self.spec.num_experts, *key)  # noqa: E731
            self._schedule_ms[key] = statistics.median(common.time_ms(fn, self.p.x.device, self.warmup_ms,
                                                                      self.rep_ms))
        return self._schedule_ms[key]

    def expected(self, kernel, block_m, slots: bool = False):
        """The default tiles' output on the same kind of schedule (``slots``: a slot schedule, whose gate_up rows
        are in slot order; else a built one's, in sorted order, which does not depend on the block map)."""
        key = (kernel, block_m, slots)
        if key not in self._expected:
            gate_up_t, down_t = default_tiles(self.T * self.spec.top_k / self.spec.num_experts, False)
            t = _schedule_tiles(replace(gate_up_t if kernel == "gate_up" else down_t, block_m=block_m),
                                "expert_groups")
            s = self.schedule_for(t) if slots else self.sched(*t.block_map)
            self._expected[key] = self._call(kernel, t, s)()
        return self._expected[key]

    def measure(self, kernel, t: TileConfig) -> dict:
        try:
            fn = self.fn(kernel, t)
            err = check(fn(), self.expected(kernel, t.block_m, self.uses_slots(t)))
            if not err <= 1e-2:
                return {"status": "wrong", "rel_err": err}
            times = common.time_ms(fn, self.p.x.device, self.warmup_ms, self.rep_ms)
        except Exception as why:  # noqa: BLE001 - e.g. out of resources: recorded, never chosen
            return {"status": "error", "reason": f"{type(why).__name__}: {str(why)[:200]}"}
        return {"status": "ok", "rel_err": err, **common.quantiles(times)}


def num_steps(cfg) -> int:
    return len(list(cfg.profile.get("tokens") or cfg.experiment.tokens)) * max(1, len(cfg.experiment.skew_experts))


def run(cfg, spec, device, dtype, seed, prov, ceilings, progress) -> list[dict]:
    """Tiles for ``spec``'s shape, or, with ``experiment.skew_experts``, for the skew experiment's shapes
    at those E (each on its own routing of random router weights: close to uniform)."""
    e = cfg.experiment
    specs = [skew_spec(spec, E, e.skew_top_k) for E in e.skew_experts] if e.skew_experts else [spec]
    rows = []
    for s in specs:
        rows += _tune_shape(cfg, s, device, dtype, seed, prov, progress)
    return rows


def _tune_shape(cfg, spec, device, dtype, seed, prov, progress) -> list[dict]:
    # On the CPU (profile=smoke) the sweep only proves itself: interpreter times, no table written.
    gpu = device.type == "cuda"
    space = cfg.experiment.space
    tokens = list(cfg.profile.get("tokens") or cfg.experiment.tokens)
    if gpu and cfg.experiment.precompile_workers:
        precompile(all_candidates(spec, tokens, space), dtype, cfg.experiment.precompile_workers)
    deadline = time.time() + 60 * cfg.experiment.max_minutes
    big = make_problem(spec, max(tokens), dtype, device, seed)
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if gpu else 1
    rows, chosen = [], {}
    for T in tokens:
        if time.time() > deadline:
            progress.step(f"{spec.name} T={T}: skipped (experiment.max_minutes={cfg.experiment.max_minutes} reached)")
            continue
        p = replace(big, x=big.x[:T])
        bench = _Bench(p, spec, T, dtype, cfg.experiment.warmup_ms, cfg.experiment.rep_ms)
        tpe = T * spec.top_k / spec.num_experts
        base = dict(experiment="tune", model=spec.name, dtype=str(dtype).replace("torch.", ""), T=T,
                    tokens_per_expert=tpe, **prov)
        best = {}  # (kernel, block_m) -> (tiles, row)
        measured_by = {}  # (kernel, block_m) -> [(tiles, row)] on the model's routing
        for bm in block_m_candidates(tpe):
            for kernel in ("gate_up", "down"):
                measured = []
                for stage in ("coarse", "refine"):
                    if stage == "coarse":
                        configs = coarse(kernel, bm, space)
                    else:
                        ok = [m for m in measured if m[1]["status"] == "ok"]
                        if not ok:
                            break
                        top = min(ok, key=lambda m: m[1]["ms_p50"])[0]
                        # split-K pays where the down projection has fewer tiles than ~2 waves
                        tiles = -(-T * spec.top_k // bm) * -(-spec.hidden_size // top.block_n)
                        configs = refine(kernel, top, space, tiles < 2 * num_sms)
                    for t in configs:
                        r = bench.measure(kernel, t)
                        measured.append((t, r))
                        rows.append({**base, "kernel": kernel, "config": _cfg_str(t), "stage": stage,
                                     "tiles": asdict(t), "routing": None, **r})
                measured_by[(kernel, bm)] = measured
                ok = [m for m in measured if m[1]["status"] == "ok"]
                if ok:
                    best[(kernel, bm)] = min(ok, key=lambda m: m[1]["ms_p50"])
        worst = None
        if cfg.experiment.robust_skews and T >= cfg.experiment.robust_min_tokens and best:
            best_pair, worst, robust_rows = _robust_pair(cfg, spec, T, p, dtype, seed, bench, measured_by, base)
            rows += robust_rows
        else:
            best_pair = _choose_pair(best, bench)
        check = None
        if best_pair is not None and worst is None and cfg.experiment.get("forward_check_rounds", 0):
            best_pair, check, check_rows = _forward_check(cfg.experiment, spec, T, dtype, device, bench, best_pair,
                                                          base)
            rows += check_rows
        if best_pair is not None:
            total, (gt, gr), (dt, dr) = best_pair
            default_ms = _default_total(bench, tpe)
            chosen[T] = {"gate_up": asdict(gt), "down": asdict(dt), "gate_up_ms": gr["ms_p50"],
                         "down_ms": dr["ms_p50"], "default_ms": default_ms}
            if worst is not None:
                chosen[T]["worst"] = worst
            if check is not None:
                chosen[T]["forward_check"] = check
            progress.step(f"{spec.name} T={T}: {total:.3f} ms (defaults {default_ms:.3f}) gate_up {_cfg_str(gt)} | "
                          f"down {_cfg_str(dt)}" + (f" | slowest routing {worst['routing']} {worst['ms']:.3f} ms"
                                                    if worst else "")
                          + (f" | forward: tuned {check['tuned_ms']:.3f} ms, before {check['before_ms']:.3f} ms, "
                             f"kept {check['kept']}" if check else ""))
        else:
            progress.step(f"{spec.name} T={T}: no working config")
        del bench, p
        torch.cuda.empty_cache()
    if chosen and gpu and cfg.experiment.write_configs:
        _write_table(spec, dtype, device, chosen, prov)
    return rows


def _forward_check(e, spec, T, dtype, device, bench, pair, base) -> tuple:
    """The GEMMs' fastest pair against the tiles the package runs at T before this tune (the table's, or the
    defaults), as the experts' forward (schedule, both GEMMs, combine) on the model's routing, the two timed in
    turns for ``e.forward_check_rounds`` rounds in this process. The faster forward's pair is kept: a re-tune
    never makes the forward slower than what it replaces, as measured here (PERF_LOG v21: GEMM-alone winners
    that the forward did not confirm, and one that made it 1.7x slower). Returns (the pair to keep, as
    ``_choose_pair`` gives it, or None; {"tuned_ms", "before_ms", "kept"}, or None where the tiles are the
    same; rows)."""
    _, (gt, gr), (dt, dr) = pair
    before = get_tiles(T, spec.top_k, spec.num_experts, spec.intermediate_size, spec.hidden_size, dtype, device)
    if before == (gt, dt):
        return pair, None, []
    p = bench.p
    pairs = {"tuned": (gt, dt), "before": before}
    fns = {name: (lambda tiles=tiles: tritonmoe.fused_experts(p.x, p.w13, p.w2, bench.weights, bench.ids,
                                                              tiles=tiles)) for name, tiles in pairs.items()}
    medians = {name: [] for name in fns}
    failed = {}
    for _ in range(e.forward_check_rounds):  # in turns: a power-capped GPU's drift hits both alike
        for name, fn in fns.items():
            if name in failed:
                continue
            try:
                medians[name].append(statistics.median(common.time_ms(fn, device, e.warmup_ms, e.rep_ms)))
            except Exception as why:  # noqa: BLE001 - e.g. tiles of an older table this code no longer runs
                failed[name] = f"{type(why).__name__}: {str(why)[:200]}"
    if "tuned" in failed:
        raise RuntimeError(f"tune: the chosen tiles fail in the forward at T={T}: {failed['tuned']}")
    ms = {name: statistics.median(m) if m else float("inf") for name, m in medians.items()}
    kept = "tuned" if ms["tuned"] <= ms["before"] else "before"
    rows = [{**base, "kernel": "forward", "config": f"{_cfg_str(t[0])}|{_cfg_str(t[1])}", "stage": "forward_check",
             "tiles": [asdict(t[0]), asdict(t[1])], "routing": None, "candidate": name, "kept": name == kept,
             **({"status": "error", "reason": failed[name]} if name in failed else
                {"status": "ok", "ms_p50": ms[name], "round_ms": medians[name]})}
            for name, t in pairs.items()]
    check = {"tuned_ms": ms["tuned"], "before_ms": ms["before"], "kept": kept}
    if kept == "tuned":
        return pair, check, rows
    bu, bd = before
    up, down = bench.measure("gate_up", bu), bench.measure("down", bd)  # the kept tiles' GEMMs alone, for the record
    if up["status"] != "ok" or down["status"] != "ok":  # cannot happen where their forward ran; said if it does
        check["kept"] = "tuned"
        for r in rows:
            r["kept"] = r["candidate"] == "tuned"
        return pair, check, rows
    return (up["ms_p50"] + down["ms_p50"], (bu, up), (bd, down)), check, rows


def _choose_pair(best: dict, bench) -> tuple | None:
    """(total ms, gate_up (tiles, row), down (tiles, row)): the fastest pair, where a down projection with
    another block map than the gate+up's (block_m, absorb_m, busy_first) pays the build of its own (timed here)."""
    pairs = []
    for (ku, _), up in best.items():
        for (kd, _), down in best.items():
            if (ku, kd) == ("gate_up", "down"):
                same = up[0].block_map == down[0].block_map or bench.uses_slots(up[0]) and bench.uses_slots(down[0])
                extra = 0.0 if same else bench.schedule_ms(*down[0].block_map)
                pairs.append((up[1]["ms_p50"] + down[1]["ms_p50"] + extra, up, down))
    return min(pairs, key=lambda p: p[0]) if pairs else None


def robust_variants(kernel: str, t: TileConfig, space) -> list[TileConfig]:
    """Tail-tile, N-sweep, absorbed-tail and interleaved variants of ``t`` for the robust stage: the levers
    that act under skew (fewer padded rows in partial blocks; hot and cold experts' tiles running side by
    side; fewer blocks that stream an expert's weights again for a few rows). Persistent tiles, which run
    full-height tiles over all of N in one sweep, get the interleaved one only."""
    out = [replace(t, interleave=True, sweep_n=0)] if space.get("robust_interleave") and not t.interleave else []
    if not t.persistent:
        out += [replace(t, min_block_m=h) for h in space.get("robust_min_block_m", []) if h < t.block_m]
        out += [replace(t, sweep_n=n) for n in space.get("robust_sweep_n", []) if not t.interleave]
        out += _absorb_variants(t, space.get("robust_absorb_m", []))
    return [v for v in out if v != t and _fits(kernel, v)]


def _robust_pair(cfg, spec, T, p, dtype, seed, bench, measured_by, base) -> tuple:
    """(pair as _choose_pair gives it, {"routing", "ms", "routings"}: its slowest routing and that total,
    rows): finalists timed on the model's routing and on the skew experiment's routings at
    ``experiment.robust_skews`` (its generator and seed); the pair whose slowest routing (gate+up + down,
    plus a second block map where their block maps differ) is fastest."""
    e = cfg.experiment
    finalists = {}  # (kernel, block_m) -> [tiles]
    for key, measured in measured_by.items():
        ok = sorted((m for m in measured if m[1]["status"] == "ok"), key=lambda m: m[1]["ms_p50"])
        picks = [t for t, _ in ok[:e.robust_finalists]]
        if picks:
            picks += [v for v in robust_variants(key[0], picks[0], e.space) if v not in picks]
            finalists[key] = picks
    if bench.p.x.device.type == "cuda" and e.precompile_workers:
        precompile([(k, t) for (k, _), ts in finalists.items() for t in ts], dtype, e.precompile_workers)
    g = torch.Generator(device=p.x.device).manual_seed(seed + T)
    benches = {"model": bench}
    for skew in e.robust_skews:
        ids = skewed_topk_ids(T, spec.top_k, spec.num_experts, skew, seed=seed).to(p.x.device)
        w = torch.rand(T, spec.top_k, generator=g, device=p.x.device)
        benches[str(skew)] = _Bench(p, spec, T, dtype, e.warmup_ms, e.rep_ms, routing=(w / w.sum(1, keepdim=True), ids))
    rows, ms = [], {}  # ms[(kernel, tiles)][routing]
    for (kernel, _), ts in finalists.items():
        for t in ts:
            for routing, b in benches.items():
                r = b.measure(kernel, t)
                rows.append({**base, "kernel": kernel, "config": _cfg_str(t), "stage": "robust", "tiles": asdict(t),
                             "routing": routing, **r})
                if r["status"] == "ok":
                    ms.setdefault((kernel, t), {})[routing] = r
    best = slowest_routing_pair(ms, list(benches), lambda r, block_map: benches[r].schedule_ms(*block_map))
    if best is None:
        return None, None, rows
    worst_ms, slowest, (up, up_by), (down, down_by) = best
    model_ms = up_by["model"]["ms_p50"] + down_by["model"]["ms_p50"]
    return ((model_ms, (up, up_by["model"]), (down, down_by["model"])),
            {"routing": slowest, "ms": worst_ms, "routings": list(benches)}, rows)


def slowest_routing_pair(ms: dict, routings: list, schedule_ms) -> tuple | None:
    """Of the (gate_up, down) pairs timed ok on every routing (``ms[(kernel, tiles)][routing]`` rows),
    the one whose slowest routing is fastest: (its total ms there, that routing, (gate_up tiles, rows by
    routing), (down tiles, rows by routing)). A down projection with another block map than the gate+up's
    (block_m, absorb_m, busy_first) pays ``schedule_ms(routing, down.block_map)``, the build of its own."""
    complete = {kt: by for kt, by in ms.items() if all(r in by for r in routings)}
    pairs = []
    for (ku, up), up_by in complete.items():
        for (kd, down), down_by in complete.items():
            if (ku, kd) != ("gate_up", "down"):
                continue
            totals = {r: up_by[r]["ms_p50"] + down_by[r]["ms_p50"]
                      + (0.0 if up.block_map == down.block_map else schedule_ms(r, down.block_map)) for r in routings}
            slowest = max(totals, key=totals.get)
            pairs.append((totals[slowest], slowest, (up, up_by), (down, down_by)))
    return min(pairs, key=lambda q: q[0]) if pairs else None


def _default_total(bench, tpe) -> float:
    gate_up_t, down_t = default_tiles(tpe, False)
    return sum(statistics.median(common.time_ms(bench.fn(k, t), bench.p.x.device, bench.warmup_ms, bench.rep_ms))
               for k, t in (("gate_up", gate_up_t), ("down", down_t)))


def _cfg_str(t: TileConfig) -> str:
    return (f"m{t.block_m}n{t.block_n}k{t.block_k}g{t.group_m}w{t.num_warps}s{t.num_stages}"
            + (f"sk{t.split_k}" if t.split_k > 1 else "") + ("tma" if t.tma else "")
            + ("perm" if t.permute_input else "") + ("pers" if t.persistent else "")
            + (f"sw{t.sweep_n}" if t.sweep_n else "") + (f"tail{t.min_block_m}" if t.min_block_m else "")
            + (f"abs{t.absorb_m}" if t.absorb_m else "") + ("" if t.gate_up_one_dot else "2dot")
            + ("il" if t.interleave else ""))


def _write_table(spec, dtype, device, chosen: dict, prov: dict) -> None:
    path = CONFIG_DIR / f"{device_key(device)}.json"
    table = json.loads(path.read_text()) if path.exists() else {"configs": {}, "sources": {}}
    key = problem_key(spec.num_experts, spec.intermediate_size, spec.hidden_size, dtype)
    # A run over some T replaces those buckets and keeps the others; each bucket names its run.
    buckets = table["configs"].setdefault(key, {})
    source = table["sources"].setdefault(key, {"model": spec.name, "ms": {}})
    source["results"] = f"results/{common.device_name(device)}/tune.jsonl"
    for T, c in sorted(chosen.items()):
        # a bucket's chunk_tokens (set from a measurement, not by this tuner) stays
        kept = {k: v for k, v in buckets.get(str(T), {}).items() if k == "chunk_tokens"}
        buckets[str(T)] = {"gate_up": c["gate_up"], "down": c["down"], **kept}
        # "model": the shape's name in tune.jsonl's rows of this run (a skew shape may share a model's key: E=8 is
        # Mixtral's), where the key's own "model" names whichever run made the entry first
        source["ms"][str(T)] = {**{k: round(c[k], 4) for k in ("gate_up_ms", "down_ms", "default_ms")},
                                "commit": prov["commit"], "date": prov["date"], "model": spec.name}
        if "forward_check" in c:  # the experts' forward with these tiles and with those they replaced
            f = c["forward_check"]
            source["ms"][str(T)]["forward_check"] = {"tuned_ms": round(f["tuned_ms"], 4),
                                                     "before_ms": round(f["before_ms"], 4), "kept": f["kept"]}
        if "worst" in c:  # chosen by the robust stage: its slowest routing's total
            source["ms"][str(T)]["slowest_routing"] = {"routing": c["worst"]["routing"],
                                                       "ms": round(c["worst"]["ms"], 4),
                                                       "over": c["worst"]["routings"]}
    table["configs"][key] = dict(sorted(buckets.items(), key=lambda kv: int(kv[0])))
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    configs._load.cache_clear()  # later calls in this process see the new table
    configs._tiles.cache_clear()
    print(f"tuned tiles for {key} -> {path.relative_to(common.REPO)}")


def summary(rows: list[dict]) -> str:
    robust = any(r.get("routing") for r in rows)
    rows = [r for r in rows if r.get("routing") in (None, "model")]  # the robust stage's skew rows time other routings
    lines = [f"{'model':16s} {'T':>5s} {'kernel':8s} {'best ms':>8s} {'config':28s} {'tried':>5s}"]
    for key in sorted({(r["model"], r["T"], r["kernel"]) for r in rows}):
        ok = [r for r in rows if (r["model"], r["T"], r["kernel"]) == key and r["status"] == "ok"]
        tried = sum(1 for r in rows if (r["model"], r["T"], r["kernel"]) == key)
        if ok:
            b = min(ok, key=lambda r: r["ms_p50"])
            lines.append(f"{key[0]:16s} {key[1]:5d} {key[2]:8s} {b['ms_p50']:8.4f} {b['config']:28s} {tried:5d}")
    if robust:
        lines.append("(fastest on the model's routing; where the robust stage ran, the tiles kept are those of the "
                     "progress lines above, also in the table's sources)")
    return "\n".join(lines)
