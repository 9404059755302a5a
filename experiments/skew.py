"""T6/T7 (issues #5, #7): latency under skewed routing, relative to uniform routing at the same (E, T).

The routing is synthetic and exact: ``skewed_topk_ids`` gives every expert a prescribed number
of slots (Zipf(s) over a random ranking of the experts, or one hot expert) and every token k
distinct experts. Shapes: H from the model, and for each E the expert width F = E_model·F_model / E,
so every E holds the same weight bytes as the model (H=4096 and E·F = 8·14336 for Mixtral).

Timing: every forward of an (E, T) cell (each routing, each implementation) is checked against the float64
reference first, then all of them are timed in turns (``common.time_round_robin``), so that the GPU's drift
over the cell (at the compute-bound end it runs at its power cap) falls on uniform and skewed routings alike;
before commit 1f9f7d9 each was timed in its own loop, one after another, uniform routing first (PERF_LOG v26).
"""
from __future__ import annotations

import math
import os

import torch

from tritonmoe import reference
from . import common
from .impls import EXPERTS, Problem, Unavailable, tuned_tiles
from .latency import CHECK_TOL, check

KEY = ("experiment", "model", "dtype", "E", "T", "skew", "impl")


# ---------------------------------------------------------------------------------------------
# The skew generator
# ---------------------------------------------------------------------------------------------

def expert_counts(T: int, k: int, E: int, skew) -> list[int]:
    """Slots per expert (by popularity rank) summing to T*k, none above T (an expert is chosen at
    most once per token). ``skew``: a Zipf exponent s >= 0 (share of rank r ∝ r^-s; s = 0 is
    uniform), or "hot": one expert takes half of all slots, capped at T (all tokens), the rest
    spread evenly."""
    if not (1 <= k <= E):
        raise ValueError(f"top_k must be in [1, E={E}], got {k}")
    S = T * k
    if skew == "hot":
        if E == 1:
            return [S]
        hot = min(-(-S // 2), T)
        return [hot] + _apportion(S - hot, [1.0] * (E - 1), T)
    try:
        s = float(skew)
    except (TypeError, ValueError):
        s = float("nan")
    if s < 0 or math.isnan(s):
        raise ValueError(f"skew must be a Zipf exponent >= 0 or 'hot', got {skew!r}")
    return _apportion(S, [(r + 1) ** -s for r in range(E)], T)


def _apportion(total: int, shares: list[float], cap: int) -> list[int]:
    """Integers proportional to ``shares`` summing to ``total``, each <= cap (water-filling,
    then largest remainders)."""
    n = len(shares)
    if total > n * cap:
        raise ValueError(f"{total} slots cannot fit {n} experts of at most {cap}")
    counts, free = [0.0] * n, list(range(n))
    left = float(total)
    while free:
        weight = sum(shares[i] for i in free)
        over = [i for i in free if shares[i] / weight * left > cap]
        if not over:
            for i in free:
                counts[i] = shares[i] / weight * left
            break
        for i in over:
            counts[i] = cap
            free.remove(i)
        left = total - sum(counts)
    ints = [min(cap, math.floor(c)) for c in counts]
    order = sorted(range(n), key=lambda i: (ints[i] - counts[i], i))  # largest remainder first
    for i in order[: total - sum(ints)]:
        ints[i] += 1
    assert sum(ints) == total and max(ints) <= cap
    return ints


def dense_topk_ids(T: int, k: int, device=None) -> torch.Tensor:
    """(T, k) int32: every token on experts 0..k-1, the extreme of skew that the probes take as a control (k
    experts of T rows each, no partial M-block, the fewest weights read)."""
    return torch.arange(k, dtype=torch.int32, device=device).repeat(T, 1)


# The skew probes' problems (probe_skew_order, _group, _profile): the skew experiment's model and top-k
# (skew.yaml's top_k; the stage runs it with model=mixtral_8x7b: H = 4096, E F = 8 x 14336).
PROBE_MODEL = "mixtral_8x7b"
PROBE_TOP_K = {"default": 8, "8": 2, "16": 4}


def probe_spec(E: int, smoke: bool = False):
    """The skew probes' shape at E experts (``skew_spec`` of PROBE_MODEL, its smoke shrink for a smoke run)."""
    return skew_spec(common.model_spec(PROBE_MODEL, common.SMOKE_SHRINK if smoke else None), E, PROBE_TOP_K)


PROBE_SMOKE_CELLS = ((16, 8),)  # a probe's smoke run: one tiny (E, T) cell on the CPU interpreter


def parse_probe_cells(args: list[str], default, probe: str) -> tuple[tuple[int, int], ...]:
    """A skew probe's ``E:T`` arguments -> cells (``default`` where none are given)."""
    try:
        cells = tuple(tuple(int(v) for v in a.split(":")) for a in args)
    except ValueError:
        cells = ((),)
    if any(len(c) != 2 for c in cells):
        raise SystemExit(f"{probe}: cells are E:T, e.g. 64:2048; got {' '.join(args)}")
    return cells or tuple(default)


def probe_skews(default, probe: str) -> tuple[str, ...]:
    """A skew probe's routings: ``PROBE_SKEWS`` (comma-separated labels: a Zipf exponent, "hot" or "dense"),
    else ``default``."""
    env = os.environ.get("PROBE_SKEWS")
    if not env:
        return tuple(default)
    skews = tuple(s.strip() for s in env.split(","))
    for s in skews:
        if s not in ("hot", "dense"):
            try:
                float(s)
            except ValueError:
                raise SystemExit(f"{probe}: PROBE_SKEWS takes Zipf exponents, 'hot' or 'dense'; got {s!r}") from None
    return skews


def probe_start(smoke: bool, seed: int) -> tuple[torch.device, torch.dtype, dict]:
    """A skew probe's device and dtype (the GPU in bf16; for a smoke run the CPU interpreter in float32) and
    the fields each of its rows starts with: provenance and, on the GPU, the ceilings measured now."""
    dev, dtype = (torch.device("cpu"), torch.float32) if smoke else (torch.device("cuda"), torch.bfloat16)
    return dev, dtype, {**common.provenance(dev, seed), **({} if smoke else common.measure_ceilings(dev, 100, 500))}


def probe_problem(E: int, T: int, device, dtype, seed: int, smoke: bool = False):
    """A skew probe's cell: (spec, (x, w13, w2, topk_weights), chunk_tokens, (gate_up, down) tiles), the tiles and
    chunks the forward takes from the tuned table for that shape and T."""
    spec = probe_spec(E, smoke)
    chunk, tiles = tuned_tiles(spec, T, dtype, device)
    return spec, random_inputs(spec, T, device, dtype, seed), chunk, tiles


def probe_topk_ids(routing: str, T: int, k: int, E: int, device, seed: int = 0) -> torch.Tensor:
    """A skew probe's routing by its label: "dense" (``dense_topk_ids``), else a skew of ``skewed_topk_ids``
    ("hot" or a Zipf exponent such as "2.0"), on ``device``."""
    if routing == "dense":
        return dense_topk_ids(T, k, device)
    return skewed_topk_ids(T, k, E, routing, seed=seed).to(device)


def skewed_topk_ids(T: int, k: int, E: int, skew, seed: int = 0) -> torch.Tensor:
    """(T, k) int32 expert ids with exactly ``expert_counts(T, k, E, skew)`` slots per expert
    (the ranking of expert ids is a seeded permutation) and k distinct experts per token."""
    g = torch.Generator().manual_seed(seed)
    counts = expert_counts(T, k, E, skew)
    rank_to_expert = torch.randperm(E, generator=g)
    # Lay the experts' slots out column-major over a (k, T) grid, most popular first: any run
    # of <= T consecutive cells covers distinct tokens, so no token gets an expert twice.
    flat = torch.repeat_interleave(rank_to_expert, torch.tensor(counts))
    ids = flat.view(k, T).T.contiguous()
    ids = ids[torch.randperm(T, generator=g)]                                  # tokens in random order
    ids = torch.gather(ids, 1, torch.argsort(torch.rand(T, k, generator=g), 1))  # choices in random order
    return ids.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------

def num_steps(cfg) -> int:
    e = cfg.experiment
    experts = {min(E, cfg.profile.shrink["max_experts"]) for E in e.experts} if cfg.profile.shrink else e.experts
    return len(experts) * len(_tokens(cfg)) * (len(e.skews) * len(e.impls) + 1)  # checks, then the cell's turns


def _tokens(cfg):
    return list(cfg.profile.get("tokens") or cfg.experiment.tokens)


def skew_spec(spec, E: int, top_k):
    """The shape this experiment runs at E experts: ``spec``'s H, F = E_model * F_model / E (the same
    weight bytes), top-k from ``top_k`` ({"default": k, "<E>": k}, capped at E), plain softmax routing.
    Named ``<model>_E<E>`` (the tuner writes tiles for these shapes too: tune.yaml ``skew_experts``)."""
    k = min(int(top_k.get(str(E), top_k["default"])), E)
    F = max(16, spec.num_experts * spec.intermediate_size // E)
    return spec.replace(name=f"{spec.name}_E{E}", num_experts=E, top_k=k, intermediate_size=F, n_group=1,
                        topk_group=1, uses_correction_bias=False, shared_intermediate_size=0,
                        shared_expert_gate=False)


def random_inputs(spec, T: int, device, dtype, seed: int):
    """(x, w13, w2, topk_weights) for the skew shape ``spec``: whole weight tensors drawn in float32 and cast, T
    tokens, routing weights normalised per token, all from one seeded generator. The skew probes' inputs (the
    experiment itself draws expert by expert, below)."""
    g = torch.Generator(device=device).manual_seed(seed)
    E, H, F, k = spec.num_experts, spec.hidden_size, spec.intermediate_size, spec.top_k
    w13 = (torch.randn(E, 2 * F, H, generator=g, device=device) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, F, generator=g, device=device) * F ** -0.5).to(dtype)
    x = torch.randn(T, H, generator=g, device=device).to(dtype)
    weights = torch.rand(T, k, generator=g, device=device)
    return x, w13, w2, weights / weights.sum(1, keepdim=True)


def run(cfg, spec, device, dtype, seed, prov, ceilings, progress) -> list[dict]:
    e = cfg.experiment
    rows = []
    H = spec.hidden_size
    experts = list(e.experts)
    if cfg.profile.shrink:  # the smoke profile: at most shrink.max_experts
        experts = sorted({min(E, cfg.profile.shrink["max_experts"]) for E in experts})
    for E in experts:
        sub = skew_spec(spec, E, e.top_k)
        k, F = sub.top_k, sub.intermediate_size
        g = torch.Generator(device=device).manual_seed(seed)
        w13 = torch.empty(E, 2 * F, H, device=device, dtype=dtype)
        w2 = torch.empty(E, H, F, device=device, dtype=dtype)
        for i in range(E):
            w13[i] = (torch.randn(2 * F, H, generator=g, device=device) * H ** -0.5).to(dtype)
            w2[i] = (torch.randn(H, F, generator=g, device=device) * F ** -0.5).to(dtype)
        for T in _tokens(cfg):
            x = (torch.randn(T, H, generator=g, device=device)).to(dtype)
            p = Problem(sub, x, None, None, w13, w2)
            built = {}  # impl -> its experts (a callable of weights, ids), or why it is unavailable
            for impl in e.impls:
                try:
                    built[impl] = EXPERTS[impl](p)
                except Unavailable as why:
                    built[impl] = why
            cell, fns = [], {}  # the cell's rows; (skew, impl) -> the checked forward, timed below
            for skew in e.skews:
                ids = skewed_topk_ids(T, k, E, skew, seed=seed).to(device)
                weights = torch.rand(T, k, generator=g, device=device)
                weights = weights / weights.sum(1, keepdim=True)
                ref = reference.fused_experts(x, w13, w2, weights, ids)
                counts = torch.bincount(ids.flatten().long(), minlength=E)
                terms = common.floor_terms(sub, T, int((counts > 0).sum()), torch.finfo(dtype).bits // 8)
                floor_ms = common.floor_ms(terms, ceilings)
                for impl in e.impls:
                    row = dict(experiment="skew", model=spec.name, dtype=str(dtype).replace("torch.", ""), E=E, T=T,
                               k=k, H=H, F=F, skew=str(skew), impl=impl, max_count=int(counts.max()),
                               distinct_experts=int((counts > 0).sum()), floor_ms=floor_ms, **terms, **ceilings,
                               **prov)
                    fn = None if isinstance(built[impl], Unavailable) else \
                        (lambda experts=built[impl], weights=weights, ids=ids: experts(weights, ids))
                    row.update(_check(cfg, impl, built[impl], fn, T, ref, device, dtype))
                    if row["status"] == "ok":
                        fns[str(skew), impl] = fn
                    cell.append(row)
                    progress.step(f"E={E} T={T} skew={skew} {impl}: {row['status']}")
                del ref
            # every checked forward of the cell timed in turns: a drift of the GPU's speed (its power cap at the
            # compute-bound end) falls on every routing and implementation alike
            rounds = _rounds(cfg, fns, device)
            times = common.time_round_robin(fns, device, rounds, seed) if fns else {}
            for row in cell:
                if row["status"] == "ok":
                    q = common.quantiles(times[row["skew"], row["impl"]])
                    row.update(q, spread_ms=q["ms_p80"] - q["ms_p20"], timing="round_robin", rounds=rounds)
            rows += cell
            progress.step(f"E={E} T={T}: {len(fns)} forwards timed in {rounds} rounds")
        del w13, w2
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _check(cfg, impl, experts, fn, T, ref, device, dtype) -> dict:
    """A forward's status against the float64 reference (and, for tritonmoe_fused at small T, its time replayed
    from a CUDA graph, timed here on its own); the eager time comes from the cell's turns (``run``)."""
    if isinstance(experts, Unavailable):
        return {"status": "unavailable", "reason": str(experts)}
    with torch.no_grad():
        err = check(fn(), ref)
        if not err <= CHECK_TOL[dtype]:
            return {"status": "wrong", "rel_err": err}
        row = {"status": "ok", "rel_err": err}
        if device.type == "cuda" and impl == "tritonmoe_fused" and T <= cfg.experiment.cuda_graph_max_tokens:
            # the same forward replayed from a CUDA graph: the GPU's time where the eager one waits on the host
            g = common.quantiles(common.time_graph_ms(fn, device, cfg.profile.warmup_ms, cfg.profile.rep_ms))
            row.update({f"graph_{k}": v for k, v in g.items() if k.startswith("ms_")})
    return row


def _rounds(cfg, fns: dict, device, low: int = 10, high: int = 200) -> int:
    """Rounds of turns for a cell: as many as the profile's rep_ms holds calls of its slowest forward (one round
    under the smoke profile's rep_ms = 0), between ``low`` and ``high``."""
    if not fns or cfg.profile.rep_ms <= 0:
        return 1
    slowest = max(max(t) for t in common.time_round_robin(fns, device, 1).values())
    return max(low, min(high, int(cfg.profile.rep_ms / max(slowest, 1e-3))))


def summary(rows: list[dict]) -> str:
    """Latency under skew relative to uniform routing (s=0) at the same (E, T), per implementation."""
    ok = {(r["E"], r["T"], r["skew"], r["impl"]): r["ms_p50"] for r in rows if r["status"] == "ok"}
    impls = sorted({r["impl"] for r in rows})
    skews = list(dict.fromkeys(r["skew"] for r in rows))
    lines = [f"{'E':>4s} {'T':>5s} {'impl':18s} " + " ".join(f"{'s=' + s if s != 'hot' else 'hot':>8s}" for s in skews)
             + "   (ms at s=0, then time / time at s=0)"]
    for E, T in sorted({(r["E"], r["T"]) for r in rows}):
        for impl in impls:
            base = ok.get((E, T, skews[0], impl))
            cells = [f"{ok[(E, T, s, impl)] / base if i else base:8.3f}" if base and (E, T, s, impl) in ok else f"{'-':>8s}"
                     for i, s in enumerate(skews)]
            lines.append(f"{E:4d} {T:5d} {impl:18s} " + " ".join(cells))
    return "\n".join(lines)
