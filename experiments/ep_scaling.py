"""EP scaling: one MoE layer with its experts split over N GPUs (``tritonmoe.distributed``), vs T.

    torchrun --nproc_per_node=N experiments/ep_scaling.py --model deepseek_v3 --tokens 1 32 512 4096
    python experiments/ep_scaling.py --plan --world 8 --tokens 1 32 512 4096   # analytic plan, any machine

T is the number of tokens *each rank* holds (the global batch is N*T). Per T, every rank:
builds the full layer (rank 0's weights, broadcast) and its EP slice, checks EP=N against
EP=1 (the full layer on this GPU, same tokens; tokens at a routing near-tie are left out),
then times each phase with CUDA events: all ranks leave a barrier, the L2 is flushed, one call
is timed; the row's p20/p50/p80 are over calls of the slowest rank's time per call. Phases:
``layer`` (EPMoELayer forward: router, dispatch, experts, combine, shared expert), ``ep1_layer``
(MoELayer on this GPU alone, same tokens), ``dispatch`` (ep_dispatch: schedule, counts
all-to-all, host sync, rows + metadata all-to-all), ``a2a_dispatch_rows`` and
``a2a_combine_rows`` (the two row all-to-alls alone, with this input's split sizes),
``experts`` (fused_experts on the received rows), ``combine`` (ep_combine). Rank 0 writes one
JSON line per (model, dtype, T, world, phase) with provenance to
``results/<GPU name>/ep_scaling.jsonl`` (rows measured again replace the old ones).

``--plan`` prints the analytic plan of docs/EXPERT_PARALLEL.md (``ep_plan``): no GPU, no
process group. Design and formulas: docs/EXPERT_PARALLEL.md.
"""
import os

# NVLink multicast (NVLS) must stay off on the lent multi-GPU machines: a program that uses it can
# put the host's GPUs, which others share, out of service for a day or more. NCCL reads these when
# a communicator is created, so they are set before anything else; main() refuses to run with
# NCCL_NVLS_ENABLE set to anything but 0.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # torchrun runs this file as a script: make `experiments` importable

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tritonmoe  # noqa: E402  (before triton: without a GPU it switches on the interpreter)
from tritonmoe import reference  # noqa: E402
from tritonmoe.distributed import EPMoELayer, ep_combine, ep_dispatch  # noqa: E402
from tritonmoe.specs import ModelSpec, get_spec  # noqa: E402

KEY = ("experiment", "model", "dtype", "T", "world", "phase")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Datasheet peaks, not measurements: defaults of the plan's parameters (override them with the
# flags). H100 SXM5 / H200: HBM3 3.35 / HBM3e 4.8 TB/s, 989 TFLOP/s dense bf16 (both), NVLink 4
# 900 GB/s per GPU both directions together, so 450 GB/s out of each GPU.
GPU_PEAKS = {
    "h100": dict(hbm_GBps=3350.0, tflops=989.0, nvlink_GBps=450.0),
    "h200": dict(hbm_GBps=4800.0, tflops=989.0, nvlink_GBps=450.0),
}
# The all-to-all bandwidths the plan is tabulated at: the NVLink peak and two lower "what if"s.
# What NCCL's all-to-all really reaches out of one GPU is for the measurement to say.
LINK_FRACTIONS = (1.0, 2 / 3, 1 / 3)
COLLECTIVES_PER_LAYER = 4  # counts, rows, ids + weights, rows back (tritonmoe.distributed)
META_BYTES_PER_SLOT = 8    # int32 local expert id + float32 weight


# ---------------------------------------------------------------------------------------------
# The analytic plan
# ---------------------------------------------------------------------------------------------

def crossover(c0: float, c1: float, a: float, d: float):
    """Where t_comm(T) = c0 + c1 T is at least t_comp(T) = max(a, d T), for T >= 0.

    Returns ``(t_start, t_end)``: comm >= compute for t_start <= T <= t_end (t_end may be inf),
    or None when compute dominates at every T. Below T = a/d compute is the constant weight
    read and comm catches up at (a - c0)/c1; above it both grow, comm by c1, compute by d.
    """
    t_flop = a / d
    t_start = max(0.0, (a - c0) / c1)
    if t_start > t_flop:      # comm is still below the weight read where compute starts to grow
        return None           # ... and then it is behind with c1 < d, as f(a/d) < 0 implies
    t_end = float("inf") if c1 >= d else c0 / (d - c1)
    return t_start, t_end


def ep_plan(spec: ModelSpec, world: int, tokens, *, hbm_GBps: float, tflops: float, link_GBps,
            alpha_us: float, dtype_bytes: int = 2) -> dict:
    """EP=world for one layer of ``spec``, T tokens per rank, uniform routing, floors only.

    Per rank: weight bytes W = (E/N) 3 H F b (all its experts); FLOPs = 2 T k 3 H F (= 2 T_g k
    3 H F / N, T_g = N T); t_comp = max(W / B_hbm, FLOPs / P). Each all-to-all moves T k H b
    bytes each way, (N-1)/N of them off the GPU; t_comm = n alpha + T k (2 H b + 8) (N-1)/N / B_link
    (two row all-to-alls, the ids + weights, n = 4 collectives).
    """
    H, F, E, k = spec.hidden_size, spec.intermediate_size, spec.num_experts, spec.top_k
    N, b = world, dtype_bytes
    if E % N:
        raise ValueError(f"num_experts={E} is not divisible by world={N}")
    off = (N - 1) / N
    weight_bytes = E // N * 3 * H * F * b
    a = weight_bytes / (hbm_GBps * 1e9)                          # s: read the rank's expert weights once
    d = 2 * k * 3 * H * F / (tflops * 1e12)                      # s per token: FLOP floor
    c0 = COLLECTIVES_PER_LAYER * alpha_us * 1e-6
    bytes_per_token = k * (2 * H * b + META_BYTES_PER_SLOT) * off  # off-GPU bytes per token, both ways
    rows, summary = [], []
    for T in tokens:
        r = {"T": T, "T_global": N * T, "a2a_MB_each_way": T * k * H * b / 1e6,
             "experts_touched": E // N * (1 - (1 - k / E) ** (N * T)),
             "t_weights_us": a * 1e6, "t_flops_us": d * T * 1e6, "t_comp_us": max(a, d * T) * 1e6}
        for B in link_GBps:
            t_comm = c0 + T * bytes_per_token / (B * 1e9)
            r[f"t_comm_us@{B:g}"] = t_comm * 1e6
            r[f"comm/comp@{B:g}"] = t_comm / max(a, d * T)
        rows.append(r)
    for B in link_GBps:
        c1 = bytes_per_token / (B * 1e9)
        summary.append({"link_GBps": B, "crossover": crossover(c0, c1, a, d), "asymptotic_comm/comp": c1 / d,
                        "T_flop_bound": a / d})
    params = dict(model=spec.name, world=N, H=H, F=F, E=E, k=k, dtype_bytes=b, hbm_GBps=hbm_GBps, tflops=tflops,
                  alpha_us=alpha_us, weight_bytes_per_rank=weight_bytes)
    return {"params": params, "rows": rows, "summary": summary}


def _us(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def format_plan(plan: dict) -> str:
    p = plan["params"]
    links = [s["link_GBps"] for s in plan["summary"]]
    out = [f"EP plan: {p['model']}, EP={p['world']}, H={p['H']}, F={p['F']}, E={p['E']}, k={p['k']}, "
           f"{p['dtype_bytes']}-byte weights and activations; T = tokens per rank (global N*T)",
           f"parameters (not measurements): HBM {p['hbm_GBps']:g} GB/s, {p['tflops']:g} TFLOP/s, "
           f"all-to-all {', '.join(f'{b:g}' for b in links)} GB/s out of each GPU, "
           f"{p['alpha_us']:g} us per collective x {COLLECTIVES_PER_LAYER}",
           f"weights of the rank's {p['E'] // p['world']} experts: {p['weight_bytes_per_rank'] / 1e9:.3f} GB", ""]
    head = ["T", "N*T", "a2a MB each way", "experts touched", "t_weights us", "t_flops us"]
    head += [f"t_comm us @{b:g}" for b in links] + [f"comm/comp @{b:g}" for b in links]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for r in plan["rows"]:
        cells = [str(r["T"]), str(r["T_global"]), f"{r['a2a_MB_each_way']:.3g}", f"{r['experts_touched']:.1f}",
                 _us(r["t_weights_us"]), _us(r["t_flops_us"])]
        cells += [_us(r[f"t_comm_us@{b:g}"]) for b in links] + [f"{r[f'comm/comp@{b:g}']:.2f}" for b in links]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for s in plan["summary"]:
        c = s["crossover"]
        where = ("compute dominates at every T" if c is None else
                 f"communication >= compute for T in [{c[0]:.0f}, {'inf' if c[1] == float('inf') else f'{c[1]:.0f}'}]")
        out.append(f"all-to-all at {s['link_GBps']:g} GB/s: {where}; large-T comm/comp -> "
                   f"{s['asymptotic_comm/comp']:.2f}; FLOP-bound from T = {s['T_flop_bound']:.0f}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# The measurement (torchrun, NCCL, one GPU per rank)
# ---------------------------------------------------------------------------------------------

def _time_phase(fn, *, reps: int, warmup: int, device, flush, world: int):
    """Per call, the slowest rank's time (ms); and each rank's median."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        dist.barrier(device_ids=[device.index])  # all ranks start together: skew is not latency
        torch.cuda.synchronize()
        flush.zero_()                            # as triton.testing.do_bench: a cold L2
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    mine = torch.tensor([s.elapsed_time(e) for s, e in zip(start, end)], device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    every = torch.stack(every)                                   # (world, reps)
    return every.max(0).values.tolist(), [statistics.median(r) for r in every.tolist()]


def _gather_ints(values, device, world):
    t = torch.tensor(values, device=device, dtype=torch.int64)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def measure(args) -> None:
    from experiments import common
    from experiments.latency import CHECK_TOL, ROUTE_MARGIN

    if os.environ.get("NCCL_NVLS_ENABLE") != "0":
        raise SystemExit("NCCL_NVLS_ENABLE must be 0 (NVLink multicast stays off on the lent machines)")
    if not torch.cuda.is_available():
        raise SystemExit("the measurement needs CUDA GPUs (torchrun --nproc_per_node=N); --plan runs anywhere")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = get_spec(args.model)
    dtype = DTYPES[args.dtype]
    H, E, k = spec.hidden_size, spec.num_experts, spec.top_k
    if E % world:
        raise SystemExit(f"{spec.name} has {E} experts, not divisible by {world} ranks")

    torch.manual_seed(args.seed)
    with torch.no_grad():
        full = tritonmoe.MoELayer(spec, dtype=dtype, device=device)
        for t in full.state_dict().values():
            dist.broadcast(t, src=0)  # the same weights on every rank, whatever each GPU's RNG does
        ep = EPMoELayer.from_layer(full, rank=rank, world_size=world, device=device)
    prov = common.provenance(device, args.seed)
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    bias = full.e_score_correction_bias
    rows = []
    for T in args.tokens:
        g = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + 7919 * rank + T)
        x = torch.randn(T, H, generator=g, device=device).to(dtype)
        with torch.no_grad():
            # Numerics first: EP=N vs EP=1 (the whole layer on this GPU), same tokens.
            out_ep, out_1 = ep(x), full(x)
            logits = full.router_logits(x)
            clear = reference.selection_margin(logits, spec, correction_bias=bias) > ROUTE_MARGIN
            diff = (out_ep.double() - out_1.double())[clear]
            err = (diff.norm() / out_1.double()[clear].norm().clamp_min(1e-30)).item() if int(clear.sum()) else 0.0
            if torch.isnan(out_ep).any():
                err = float("inf")
            errs = [torch.zeros(1, device=device, dtype=torch.float64) for _ in range(world)]
            dist.all_gather(errs, torch.tensor([err], device=device, dtype=torch.float64))
            max_err = max(e.item() for e in errs)

            weights, ids = tritonmoe.route(logits, spec, correction_bias=bias)
            handle = ep_dispatch(x, weights, ids, num_experts=E)
            expert_rows = tritonmoe.fused_experts(handle.hidden_states, ep.w13, ep.w2, handle.weights,
                                                  handle.expert_ids)
            send_buf = torch.randn(T * k, H, device=device).to(dtype)
            recv_buf = torch.empty_like(handle.hidden_states)
            back_buf = torch.empty_like(send_buf)
            phases = {
                "layer": lambda: ep(x),
                "ep1_layer": lambda: full(x),
                "dispatch": lambda: ep_dispatch(x, weights, ids, num_experts=E),
                "a2a_dispatch_rows": lambda: dist.all_to_all_single(recv_buf, send_buf, handle.recv_splits,
                                                                    handle.send_splits),
                "experts": lambda: tritonmoe.fused_experts(handle.hidden_states, ep.w13, ep.w2, handle.weights,
                                                           handle.expert_ids),
                "a2a_combine_rows": lambda: dist.all_to_all_single(back_buf, expert_rows, handle.send_splits,
                                                                   handle.recv_splits),
                "combine": lambda: ep_combine(expert_rows, handle),
            }
            splits = _gather_ints(handle.send_splits, device, world)        # [src][dst] rows
            b = torch.finfo(dtype).bits // 8
            for phase, fn in phases.items():
                per_call, per_rank = _time_phase(fn, reps=args.reps, warmup=args.warmup, device=device,
                                                 flush=flush, world=world)
                row = {"experiment": "ep_scaling", "model": spec.name, "dtype": str(dtype).replace("torch.", ""),
                       "T": T, "T_global": T * world, "world": world, "phase": phase,
                       **common.quantiles(per_call), "ms_p50_per_rank": per_rank,
                       "rows_sent_per_rank": [sum(s) for s in splits],
                       "rows_received_per_rank": [sum(s[d] for s in splits) for d in range(world)],
                       "rel_err_vs_ep1": max_err, "check_tol": CHECK_TOL[dtype], "check_ok": max_err <= CHECK_TOL[dtype],
                       **prov}
                if phase.startswith("a2a_"):
                    # bytes leaving the busiest GPU (rows to other ranks) over the slowest rank's median
                    off = max((sum(s) - s[r]) if phase == "a2a_dispatch_rows" else
                              (sum(splits[src][r] for src in range(world)) - splits[r][r]) for r, s in enumerate(splits))
                    row["egress_bytes_max_rank"] = off * H * b
                    row["egress_GBps"] = off * H * b / (row["ms_p50"] * 1e-3) / 1e9 if row["ms_p50"] > 0 else None
                rows.append(row)
                if rank == 0:
                    print(f"{spec.name} T={T}/rank EP={world} {phase:18s} p50 {row['ms_p50']:.3f} ms"
                          + (f"  {row['egress_GBps']:.0f} GB/s out" if row.get("egress_GBps") else "")
                          + ("" if row["check_ok"] else f"  CHECK FAILED rel_err {max_err:.3g}"), flush=True)
        del handle, expert_rows, send_buf, recv_buf, back_buf
    if rank == 0:
        path = REPO / "results" / common.device_name(device) / "ep_scaling.jsonl"
        common.write_rows(path, rows, KEY)
        print(f"wrote {len(rows)} rows to {path}")
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deepseek_v3")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 512, 4096], help="tokens per rank")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=50, help="timed calls per phase (the same on every rank)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--plan", action="store_true", help="print the analytic EP plan and exit (no GPU needed)")
    p.add_argument("--world", type=int, default=8, help="--plan: EP degree")
    p.add_argument("--gpu", choices=sorted(GPU_PEAKS), default="h200", help="--plan: datasheet peaks to use")
    p.add_argument("--hbm-GBps", type=float, help="--plan: HBM bandwidth (default: the --gpu datasheet)")
    p.add_argument("--tflops", type=float, help="--plan: dense matmul rate (default: the --gpu datasheet)")
    p.add_argument("--link-GBps", type=float, nargs="+",
                   help="--plan: all-to-all bandwidths out of one GPU (default: NVLink peak x 1, 2/3, 1/3)")
    p.add_argument("--alpha-us", type=float, default=10.0, help="--plan: fixed cost per collective, assumed")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plan:
        peaks = GPU_PEAKS[args.gpu]
        links = args.link_GBps or [peaks["nvlink_GBps"] * f for f in LINK_FRACTIONS]
        plan = ep_plan(get_spec(args.model), args.world, args.tokens, hbm_GBps=args.hbm_GBps or peaks["hbm_GBps"],
                       tflops=args.tflops or peaks["tflops"], link_GBps=links, alpha_us=args.alpha_us,
                       dtype_bytes=torch.finfo(DTYPES[args.dtype]).bits // 8)
        print(format_plan(plan))
        return
    measure(args)


if __name__ == "__main__":
    main()
