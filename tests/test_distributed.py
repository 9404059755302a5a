"""Expert parallelism (tritonmoe.distributed) on 2 and 4 CPU processes (gloo, Triton interpreter)
vs the single-process reference (tritonmoe.reference) of the same problem.

Each world size gets one group of spawned ranks, kept for the module (spawning costs seconds a
process on 2 cores); a test sends one job to every rank and asserts on what the ranks return.
Every rank builds the same full problem from the same seed, runs its part, and computes the
reference for its own tokens.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import queue
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tritonmoe
from tritonmoe import reference
from tritonmoe.distributed import EPMoELayer, ep_combine, ep_dispatch, ep_fused_experts, expert_range
from conftest import ROUTE_MARGIN, TOLERANCE, random_topk_ids, rel_err
from helpers import SCHEMES, scheme_spec

H, F = 40, 24
REPO = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 120      # per job, all ranks together
GLOO_TIMEOUT_S = 60      # a collective that one rank never joins fails after this


# ---------------------------------------------------------------------------------------------
# The ranks: spawned once per world size, serving jobs
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world: int, port: int, inbox, outbox):
    """A rank's loop: run ``job(rank, world, *args)`` for each job, answer (rank, ok, value)."""
    torch.set_num_threads(1)  # world processes share 2 cores
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    except BaseException:
        outbox.put((rank, False, traceback.format_exc()))
        return
    outbox.put((rank, True, "ready"))
    while True:
        item = inbox.get()
        if item is None:
            break
        job, args = item
        try:
            outbox.put((rank, True, job(rank, world, *args)))
        except BaseException:
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class Ranks:
    """``world`` processes in one gloo group on 127.0.0.1, each with TRITON_INTERPRET=1."""

    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.outbox = ctx.Queue()
        port = _free_port()
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"  # the children import triton with it (CPU tensors, gloo)
        try:
            self.procs = [ctx.Process(target=_serve, args=(r, world, port, self.inboxes[r], self.outbox),
                                      daemon=True) for r in range(world)]
            for p in self.procs:
                p.start()
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
        self.alive = True
        self._collect(JOB_TIMEOUT_S, "start")

    def _collect(self, timeout: float, what: str) -> list:
        values, errors = [None] * self.world, {}
        pending = set(range(self.world))
        deadline = time.monotonic() + timeout
        while pending:
            # After a failure, give the others a moment to fail too (their traces help), not the
            # gloo timeout: the group is torn down anyway.
            left = deadline - time.monotonic() if not errors else min(5.0, deadline - time.monotonic())
            try:
                rank, ok, value = self.outbox.get(timeout=max(left, 0.01))
            except queue.Empty:
                break
            pending.discard(rank)
            if ok:
                values[rank] = value
            else:
                errors[rank] = value
        if errors or pending:
            self.close()
            msg = [f"{what} failed on {self.world} ranks"]
            msg += [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())]
            if pending:
                msg.append(f"ranks {sorted(pending)} did not answer " + (
                    "(stopped 5 s after the first failure: probably waiting in a collective)" if errors
                    else f"within {timeout:.0f} s"))
            raise AssertionError("\n".join(msg))
        return values

    def run(self, job, *args, timeout: float = JOB_TIMEOUT_S) -> list:
        """``job(rank, world, *args)`` on every rank (a module-level function); the per-rank values."""
        assert self.alive, "the ranks were shut down by an earlier failure"
        for q in self.inboxes:
            q.put((job, args))
        return self._collect(timeout, job.__name__)

    def close(self):
        if not self.alive:
            return
        self.alive = False
        for q in self.inboxes:
            with contextlib.suppress(Exception):
                q.put(None)
        deadline = time.monotonic() + 10  # a rank stuck in a collective never reads its None
        for p in self.procs:
            p.join(timeout=max(deadline - time.monotonic(), 0.01))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


@pytest.fixture(scope="module")
def ranks():
    """ranks(world): the module's group of ``world`` ranks, restarted after a failed job."""
    groups: dict[int, Ranks] = {}

    def get(world: int) -> Ranks:
        if world not in groups or not groups[world].alive:
            groups[world] = Ranks(world)
        return groups[world]

    yield get
    for g in groups.values():
        g.close()


# ---------------------------------------------------------------------------------------------
# Jobs (run in the ranks)
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _poisoned():
    """conftest.poison inside a rank: torch.empty/empty_like return NaN (ints: -7), so an
    output element nobody writes fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def _tokens(rank: int, T: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + rank)  # each rank its own tokens
    return torch.randn(T, H, generator=g).to(dtype)


def _job_layer(rank, world, spec, dtype, tokens, seed, fused):
    """EPMoELayer.from_layer(full layer) on this rank's tokens vs reference.moe_layer(full layer)."""
    torch.manual_seed(seed)  # the same full layer on every rank
    layer = tritonmoe.MoELayer(spec, dtype=dtype, fused=fused)
    ep = EPMoELayer.from_layer(layer, rank=rank, world_size=world)
    x = _tokens(rank, tokens[rank], dtype, seed).view(1, tokens[rank], H)  # (..., H) input
    with _poisoned():
        out = ep(x)
    ref = reference.moe_layer(layer, x)
    x2, out2, ref2 = x.view(-1, H), out.view(-1, H), ref.view(-1, H)
    bias = layer.e_score_correction_bias
    margin = reference.selection_margin(layer.router_logits(x2), spec, correction_bias=bias)
    clear = margin > ROUTE_MARGIN
    err = rel_err(out2[clear], ref2[clear]) if int(clear.sum()) else 0.0
    return dict(T=x2.shape[0], clear=int(clear.sum()), err=err, shape=tuple(out.shape), dtype=out.dtype,
                w13=tuple(ep.w13.shape))


def _job_experts(rank, world, E, k, dtype, tokens, target_rank, seed, fused):
    """ep_fused_experts vs reference.fused_experts; ``target_rank`` not None routes every slot
    of every rank to that rank's experts (the other ranks receive nothing)."""
    torch.manual_seed(seed)
    w13 = (torch.randn(E, 2 * F, H) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, F) / F ** 0.5).to(dtype)
    lo, hi = expert_range(E, rank, world)
    T = tokens[rank]
    x = _tokens(rank, T, dtype, seed)
    g = torch.Generator().manual_seed(2000 * seed + rank)
    if target_rank is None:
        ids = random_topk_ids(T, k, E, "cpu", generator=g)
    else:
        t_lo, t_hi = expert_range(E, target_rank, world)
        ids = random_topk_ids(T, k, t_hi - t_lo, "cpu", generator=g) + t_lo
    weights = torch.rand(T, k, generator=g) + 0.1
    with _poisoned():
        handle = ep_dispatch(x, weights, ids, num_experts=E)
        received = sum(handle.recv_splits)
        out = ep_fused_experts(x, w13[lo:hi], w2[lo:hi], weights, ids, num_experts=E, fused=fused)
    ref = reference.fused_experts(x, w13, w2, weights, ids)
    return dict(T=T, received=received, err=rel_err(out, ref) if T else 0.0, shape=tuple(out.shape),
                dtype=out.dtype)


def _job_dispatch_combine(rank, world, E, k, tokens, seed):
    """ep_dispatch then ep_combine with identity experts: out[t] = x[t] * sum_j w[t, j]; and
    the received rows are exactly the slots routed to this rank's experts."""
    T = tokens[rank]
    x = _tokens(rank, T, torch.float32, seed)
    g = torch.Generator().manual_seed(3000 * seed + rank)
    ids = random_topk_ids(T, k, E, "cpu", generator=g).long()  # int64 ids are accepted too
    weights = torch.rand(T, k, generator=g, dtype=torch.float64) + 0.1
    lo, hi = expert_range(E, rank, world)
    with _poisoned():
        handle = ep_dispatch(x, weights, ids, num_experts=E)
        out = ep_combine(handle.hidden_states * handle.weights, handle)
    # Every rank's routing, rebuilt here from the seeds, gives what this rank must receive.
    expect = []
    for src in range(world):
        gs = torch.Generator().manual_seed(3000 * seed + src)
        ids_s = random_topk_ids(tokens[src], k, E, "cpu", generator=gs)
        torch.rand(tokens[src], k, generator=gs, dtype=torch.float64)
        mine = (ids_s >= lo) & (ids_s < hi)
        expect.append(int(mine.sum()))
    return dict(recv_splits=handle.recv_splits, expect=expect, ids_ok=bool(
        ((handle.expert_ids >= 0) & (handle.expert_ids < hi - lo)).all()),
        err=rel_err(out, x.double() * weights.sum(1, keepdim=True)) if T else 0.0, shape=tuple(out.shape))


def _job_errors(rank, world):
    """Bad arguments raise, on every rank, before any communication; the group still works after."""
    E, k, T = 2 * world, 2, 5
    per = E // world
    x = _tokens(rank, T, torch.float32, 0)
    w13, w2 = torch.randn(per, 2 * F, H), torch.randn(per, H, F)
    ids = random_topk_ids(T, k, E, "cpu", generator=torch.Generator().manual_seed(rank))
    w = torch.rand(T, k) + 0.1
    call = lambda **kw: ep_fused_experts(**{**dict(hidden_states=x, w13_local=w13, w2_local=w2, topk_weights=w,
                                                     topk_ids=ids, num_experts=E), **kw})  # noqa: E731
    cases = [
        (ValueError, "num_experts=.* not divisible by the world size", dict(num_experts=E + 1)),
        (ValueError, "num_experts must be a positive int", dict(num_experts=0)),
        (ValueError, "num_experts must be a positive int", dict(num_experts=float(E))),
        (ValueError, "w13_local holds .* experts", dict(w13_local=torch.randn(per + 1, 2 * F, H))),
        (ValueError, "w13_local has hidden size", dict(w13_local=torch.randn(per, 2 * F, H + 1))),
        (ValueError, "w13_local dim 1 must be 2\\*F", dict(w13_local=torch.randn(per, 2 * F + 1, H))),
        (ValueError, "w2_local must have shape", dict(w2_local=torch.randn(per, H, F + 1))),
        (ValueError, "w2_local must have 3 dimensions", dict(w2_local=torch.randn(H, F))),
        (TypeError, "w2_local has dtype", dict(w2_local=w2.half())),
        (ValueError, "hidden_states must have 2 dimensions", dict(hidden_states=x.view(1, T, H))),
        (ValueError, "topk_ids has 4 tokens", dict(topk_ids=ids[:4], topk_weights=w[:4])),
        (ValueError, "topk_weights shape", dict(topk_weights=w[:, :1])),
        (TypeError, "topk_ids has dtype", dict(topk_ids=ids.float())),
        (ValueError, "top_k .* must be in", dict(topk_ids=ids.new_zeros(T, 0), topk_weights=w[:, :0])),
        (ValueError, "outside \\[0, num_experts", dict(topk_ids=torch.full_like(ids, E))),
        (ValueError, "outside \\[0, num_experts", dict(topk_ids=-ids - 1)),
    ]
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            call(**kw)
    spec = scheme_spec("mixtral", E, k, H, F)
    with pytest.raises(ValueError, match="spec.num_experts=.* not divisible by world_size"):
        EPMoELayer(spec.replace(num_experts=E + 1), rank=rank, world_size=world)
    with pytest.raises(RuntimeError, match="holds the experts of rank"):  # built for another rank
        EPMoELayer(spec, rank=(rank + 1) % world, world_size=world)(x)
    with pytest.raises(RuntimeError, match="holds the experts of rank"):  # built for another world size
        EPMoELayer(spec.replace(num_experts=4 * world), rank=rank, world_size=2 * world)(x)
    handle = ep_dispatch(x, w, ids, num_experts=E)
    with pytest.raises(ValueError, match="expert_out has"):
        ep_combine(handle.hidden_states[1:], handle)
    # Nothing above left a collective half done: a valid call still works on every rank.
    out = call()
    ref = reference.fused_experts(x, *_full_from_ranks(w13, w2, world), w, ids)
    return rel_err(out, ref)


def _full_from_ranks(w13, w2, world):
    """The full weights, each rank's slice gathered (tests all_gather with the same shapes)."""
    parts13 = [torch.empty_like(w13) for _ in range(world)]
    parts2 = [torch.empty_like(w2) for _ in range(world)]
    dist.all_gather(parts13, w13.contiguous())
    dist.all_gather(parts2, w2.contiguous())
    return torch.cat(parts13), torch.cat(parts2)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

# (E, k) per routing scheme: small, E divisible by 4, groups for deepseek_v3 at E=16.
SCHEME_EK = {"mixtral": (8, 2), "qwen2": (16, 4), "deepseek_v3": (16, 4)}
# Tokens per rank, one rank with none in each.
TOKENS = {2: {torch.float32: [11, 0], torch.float16: [0, 17]},
          4: {torch.float32: [5, 0, 13, 8], torch.float16: [9, 3, 0, 20]}}


def _check_layer_results(results, dtype, tokens, world, spec):
    for rank, r in enumerate(results):
        assert r["shape"] == (1, tokens[rank], H) and r["dtype"] == dtype, (rank, r)
        assert r["w13"] == (spec.num_experts // world, 2 * spec.intermediate_size, H)
        if r["T"]:
            assert r["clear"] >= 0.9 * r["T"], f"rank {rank}: too many near-tie tokens {r}"
        assert r["err"] <= TOLERANCE[dtype], f"rank {rank}: relative error {r['err']:.3g} ({dtype}, {spec.name})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("world", [2, 4])
def test_layer_matches_reference(ranks, world, scheme, dtype):
    E, k = SCHEME_EK[scheme]
    spec = scheme_spec(scheme, E, k, H, F)
    tokens = TOKENS[world][dtype]
    results = ranks(world).run(_job_layer, spec, dtype, tokens, 1, True)
    _check_layer_results(results, dtype, tokens, world, spec)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("world", [2, 4])
def test_layer_shared_expert(ranks, world, fused):
    """Each rank computes the shared expert (and its gate) for its own tokens."""
    if fused:  # Qwen2-MoE: softmax, not renormalised, sigmoid-gated shared expert
        spec = tritonmoe.specs.QWEN2_57B_A14B.replace(num_experts=8, top_k=4, hidden_size=H, intermediate_size=F,
                                                      shared_intermediate_size=32)
    else:      # DeepSeek-V3: grouped sigmoid routing with correction bias, ungated shared expert
        spec = scheme_spec("deepseek_v3", 16, 4, H, F).replace(shared_intermediate_size=32)
    tokens = TOKENS[world][torch.float32]
    results = ranks(world).run(_job_layer, spec, torch.float32, tokens, 2, fused)
    _check_layer_results(results, torch.float32, tokens, world, spec)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("target", ["first", "last"])
def test_all_slots_to_one_rank(ranks, world, target):
    """Every slot goes to one rank's experts: the other ranks receive no rows (and run no
    expert) but take part in every collective."""
    E, k = 8, 2
    target_rank = 0 if target == "first" else world - 1
    tokens = [7, 12, 0, 4][:world]
    results = ranks(world).run(_job_experts, E, k, torch.float32, tokens, target_rank, 3, True)
    for rank, r in enumerate(results):
        assert r["shape"] == (tokens[rank], H)
        assert r["received"] == (sum(tokens) * k if rank == target_rank else 0), (rank, r)
        assert r["err"] <= TOLERANCE[torch.float32], f"rank {rank}: relative error {r['err']:.3g}"


@pytest.mark.parametrize("world", [2, 4])
def test_no_tokens_anywhere(ranks, world):
    results = ranks(world).run(_job_experts, 8, 2, torch.float16, [0] * world, None, 4, True)
    assert all(r["shape"] == (0, H) and r["received"] == 0 and r["dtype"] == torch.float16 for r in results)


@pytest.mark.parametrize("world", [2, 4])
def test_fused_experts_random_routing_fp16(ranks, world):
    tokens = [3, 16, 9, 0][:world]
    results = ranks(world).run(_job_experts, 16, 4, torch.float16, tokens, None, 5, True)
    for rank, r in enumerate(results):
        assert r["shape"] == (tokens[rank], H) and r["dtype"] == torch.float16
        assert r["err"] <= TOLERANCE[torch.float16], f"rank {rank}: relative error {r['err']:.3g}"


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_combine(ranks, world):
    tokens = [6, 0, 11, 2][:world]
    for rank, r in enumerate(ranks(world).run(_job_dispatch_combine, 16, 3, tokens, 6)):
        assert r["recv_splits"] == r["expect"], f"rank {rank}: received {r['recv_splits']}, expected {r['expect']}"
        assert r["ids_ok"] and r["shape"] == (tokens[rank], H)
        assert r["err"] <= TOLERANCE[torch.float32], f"rank {rank}: relative error {r['err']:.3g}"


def test_bad_arguments_in_group(ranks):
    for err in ranks(2).run(_job_errors):
        assert err <= TOLERANCE[torch.float32]


def test_bad_arguments_without_group():
    """What can be checked without a process group (none is initialised in this process)."""
    spec = scheme_spec("mixtral", 8, 2, H, F)
    x, w = torch.randn(3, H), torch.rand(3, 2)
    ids = torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ep_fused_experts(x, torch.randn(4, 2 * F, H), torch.randn(4, H, F), w, ids, num_experts=8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        EPMoELayer(spec)
    with pytest.raises(ValueError, match="spec.num_experts=8 is not divisible by world_size=3"):
        EPMoELayer(spec, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank must be in"):
        EPMoELayer(spec, rank=2, world_size=2)
    with pytest.raises(ValueError, match="both rank and world_size"):
        EPMoELayer(spec, rank=0)
    with pytest.raises(TypeError, match="spec"):
        EPMoELayer("mixtral", rank=0, world_size=1)
    with pytest.raises(TypeError, match="layer"):
        EPMoELayer.from_layer(spec, rank=0, world_size=2)


def test_from_layer_slices_experts():
    spec = scheme_spec("deepseek_v3", 16, 4, H, F).replace(shared_intermediate_size=32)
    torch.manual_seed(7)
    layer = tritonmoe.MoELayer(spec, dtype=torch.float16)
    for rank in range(4):
        ep = EPMoELayer.from_layer(layer, rank=rank, world_size=4)
        lo, hi = expert_range(16, rank, 4)
        assert (lo, hi) == (4 * rank, 4 * rank + 4)
        assert torch.equal(ep.w13, layer.w13[lo:hi]) and torch.equal(ep.w2, layer.w2[lo:hi])
        for name in ("router_weight", "e_score_correction_bias", "shared_w13", "shared_w2"):
            assert torch.equal(getattr(ep, name), getattr(layer, name)), name
        assert ep.w13.dtype == torch.float16 and ep.fused == layer.fused
        assert f"experts [{lo}, {hi})" in repr(ep)


# ---------------------------------------------------------------------------------------------
# The analytic EP plan of experiments/ep_scaling.py (docs/EXPERT_PARALLEL.md)
# ---------------------------------------------------------------------------------------------

def _ep_scaling():
    """experiments/ep_scaling.py as a module (the repository root need not be on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ep_scaling", REPO / "experiments" / "ep_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_crossover_matches_brute_force():
    crossover = _ep_scaling().crossover

    for c0, c1, a, d in [(40e-6, 0.446e-6, 587e-6, 0.712e-6), (40e-6, 0.669e-6, 587e-6, 0.712e-6),
                         (40e-6, 1.34e-6, 587e-6, 0.712e-6), (1e-3, 1e-7, 5e-4, 1e-6), (0.0, 2e-6, 1e-4, 1e-6)]:
        Ts = [i * 0.5 for i in range(20000)]
        dominated = [T for T in Ts if c0 + c1 * T >= max(a, d * T)]
        got = crossover(c0, c1, a, d)
        if not dominated:
            assert got is None, (c0, c1, a, d, got)
            continue
        assert got is not None and abs(got[0] - dominated[0]) <= 0.5, (got, dominated[0])
        if dominated[-1] < Ts[-1]:
            assert abs(got[1] - dominated[-1]) <= 0.5, (got, dominated[-1])
        else:
            assert got[1] >= Ts[-1]


def test_plan_runs_on_the_cpu():
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "ep_scaling.py"), "--plan", "--tokens", "1",
                           "4096"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "weights of the rank's 32 experts: 2.819 GB" in proc.stdout  # 32 * 3 * 7168 * 2048 * 2 bytes
    assert "| 4096 | 32768 | 470 |" in proc.stdout                      # 4096 * 8 * 7168 * 2 bytes each way
