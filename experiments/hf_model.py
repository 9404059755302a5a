"""Issue 8 item 4: a real decoder through Hugging Face transformers, its experts run by each
``experts_implementation`` (eager, grouped_mm, tritonmoe): prefill and decode-step latency.

The model is transformers' own Mixtral built with ``from_config`` (random, seeded weights, no
download): Mixtral-8x7B's shapes (H, F, E, k from the spec; heads, KV heads and vocab from the
yaml) with few layers, so it fits and loads in seconds. ONE model is built; the implementation
is switched with ``model.set_experts_implementation`` (attention stays transformers' default,
sdpa), so every implementation runs the same weights on the same inputs. "tritonmoe+router" is
tritonmoe's experts with the model's routers switched to tritonmoe's too (``set_impl``).

Correctness, per implementation before timing: ``experts_rel_err`` is the largest relative error
``||out - ref|| / ||ref||`` of any experts call in the checked forward against transformers' eager
experts (the undecorated forward) on that call's own inputs; above TOL the row is "wrong" and not
timed. ``rel_err`` is the model's logits against the all-eager model's on the same input ids, for
the record only: the router is the model's own, and in bfloat16 a near-tie that rounds the other
way in one layer sends a token to another expert and moves its logits by O(1) -- on an H100,
transformers' own grouped_mm reached 0.13 against eager (B=32 decode). Only the experts differ
between implementations, so the per-call check covers everything that differs.
An implementation that cannot be set or raises is recorded "unavailable" with the reason.

Prefill: one prompt of P tokens, ``use_cache=False`` (storing K/V in a fresh DynamicCache is a
reference assignment, so leaving it out changes nothing measurable) and ``logits_to_keep=1``
(the last position's logits, as ``generate`` asks for; the check compares all positions).

Decode step: B sequences of ``context`` tokens are prefilled once (eager experts) into a
DynamicCache shared by all implementations. A timed call feeds one new token per sequence: the
cache grows to context+1 (DynamicCache's torch.cat, as in ``generate``), attention runs over it,
then each layer's keys and values are set back to the tensors saved after the prefill (a
reference assignment: ``torch.cat`` made new tensors and left those unchanged), so every call
sees the same cache of ``context`` tokens, also after a call that failed half-way. The time is
thus one real decode step of ``generate`` with a DynamicCache (no sampling), plus the reset.

CUDA graphs (phases ``prefill_graph`` and ``decode_graph``, for ``graph_impls``): the same prefill
and decode calls captured once in a CUDA graph and timed as replays, which removes the Python
launch time that dominates an eager step; each is checked against the same call run uncaptured.

Times: ``common.time_ms`` (device events around each call on a GPU); eager calls of the
implementations are timed in interleaved rounds (``measure``). Transformers in eager mode
launches every op from Python, so a small step is host-bound and its time says little about the
experts: on a GPU each ok row also records ``gpu_kernel_ms``, the summed time of the GPU work one
call issues (torch.profiler), the part the experts implementation can change.
"""
from __future__ import annotations

import warnings

import torch
from omegaconf import OmegaConf

from . import common
from .latency import check  # ||out - ref|| / ||ref||, inf if out is not finite

KEY = ("experiment", "model", "layers", "dtype", "phase", "tokens", "context", "impl")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
ROUNDS = 5  # interleaved timing rounds per (phase, tokens) on a GPU (see measure)


def settings(cfg):
    """The experiment's yaml, with its ``smoke`` block merged over it when the profile shrinks the model."""
    return OmegaConf.merge(cfg.experiment, cfg.experiment.smoke) if cfg.profile.shrink else cfg.experiment


def num_steps(cfg) -> int:
    s = settings(cfg)
    return (len(s.prefill_tokens) + len(s.decode_batch)) * (len(s.impls) + len(s.graph_impls))


def build_model(spec, s, device, dtype, seed):
    from transformers import AutoModelForCausalLM, MixtralConfig
    import tritonmoe.integrations.transformers  # noqa: F401  (registers "tritonmoe")
    config = MixtralConfig(hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                           num_local_experts=spec.num_experts, num_experts_per_tok=spec.top_k,
                           num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                           vocab_size=s.vocab, initializer_range=s.initializer_range, max_position_embeddings=32768,
                           sliding_window=None)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the GPU: a float32 CPU copy of 2 layers is 11 GB and slow
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager")
    return model.eval()


def set_impl(model, impl: str) -> None:
    """``impl`` is an experts_implementation, or "tritonmoe+router": tritonmoe's experts with the
    model's routers switched to tritonmoe's (``use_tritonmoe_router``); any other switches them back."""
    from tritonmoe.integrations.transformers import use_tritonmoe_router
    model.set_experts_implementation("tritonmoe" if impl == "tritonmoe+router" else impl)
    use_tritonmoe_router(model, enable=impl == "tritonmoe+router")


def grouped_mm_kernel(model) -> str:
    """Which kernel transformers' grouped_mm runs here: torch's grouped_mm, or its per-expert loop fallback."""
    from transformers.integrations import moe
    if not hasattr(moe, "_can_use_grouped_mm"):  # a private helper of transformers 5: may move
        return "unknown"
    w = next(m.gate_up_proj for m in model.modules() if hasattr(m, "gate_up_proj"))
    x = torch.empty(16, w.shape[-1], device=w.device, dtype=w.dtype)
    offs = torch.full((w.shape[0],), 16, device=w.device, dtype=torch.int32)
    native = moe._can_use_grouped_mm(x, w, offs)
    return "torch grouped_mm" if native else "transformers' per-expert loop fallback (torch grouped_mm unusable here)"


def checked(model, fn):
    """``fn()``, and the largest error of its experts calls against eager experts on the same inputs."""
    errs = []

    def hook(module, args, kwargs, out):
        # use_experts_implementation wraps the class's own (eager) forward with functools.wraps
        eager = type(module).forward.__wrapped__(module, *args, **kwargs)
        errs.append(check(out, eager))
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
               if hasattr(m, "gate_up_proj") and hasattr(m, "is_transposed")]
    try:
        out = fn()
    finally:
        for h in handles:
            h.remove()
    assert errs, "no experts call was seen"
    return out, max(errs)


def check_impl(model, impl, checked_call, ref, dtype) -> dict:
    """Switch to ``impl`` and check ``checked_call()``: its experts calls, and its logits against ``ref``."""
    try:
        set_impl(model, impl)
        if impl.startswith("tritonmoe"):
            from tritonmoe.integrations.transformers import check_model
            check_model(model)  # says what it cannot compute now, not as a failure mid-forward
        out, experts_err = checked(model, checked_call)
    except Exception as why:  # noqa: BLE001  (any failure to run is a result: recorded, never a number)
        return {"status": "unavailable", "reason": f"{type(why).__name__}: {why}"[:500]}
    errs = {"experts_rel_err": experts_err, "rel_err": check(out, ref)}
    if not experts_err <= TOL[dtype]:
        return {"status": "wrong", **errs, "reason": f"experts_rel_err {experts_err:.3g} > {TOL[dtype]}"}
    return {"status": "ok", **errs}


def measure(model, impls, checked_call, timed, ref, cfg, device, dtype, tokens) -> dict:
    """Check every implementation, then time the ones that passed in interleaved rounds.

    An eager step is host-bound, so its time drifts with the lent machine's CPU: timed one after
    another, implementations would see different stretches of that drift. ``ROUNDS`` rounds, each
    timing every implementation for rep_ms / ROUNDS, spread the drift over all of them alike."""
    results = {impl: check_impl(model, impl, checked_call, ref, dtype) for impl in impls}
    ok = [impl for impl in impls if results[impl]["status"] == "ok"]
    times = {impl: [] for impl in ok}
    rounds = ROUNDS if device.type == "cuda" else 1
    for _ in range(rounds):
        for impl in ok:
            set_impl(model, impl)
            times[impl] += common.time_ms(timed, device, cfg.profile.warmup_ms / rounds, cfg.profile.rep_ms / rounds)
    for impl in ok:
        set_impl(model, impl)
        q = common.quantiles(times[impl])
        results[impl].update(q, rounds=rounds, tokens_per_s=tokens / (q["ms_p50"] * 1e-3), **gpu_kernels(timed, device))
    return results


def measure_graph(model, impl, fn, cfg, device, dtype, tokens) -> dict:
    """``fn`` with ``impl`` captured in one CUDA graph and timed as replays (no Python launch time).
    Checked first: a replay's logits against the same call run eagerly (the per-call experts check
    cannot see inside a graph). An implementation that synchronises with the host cannot be
    captured: that is recorded as "unavailable" with the reason."""
    if device.type != "cuda":
        return {"status": "unavailable", "reason": "CUDA graphs need a CUDA device"}
    try:
        set_impl(model, impl)
        want = fn().clone()
        graph, out = common.capture_graph(fn)
        graph.replay()
        torch.cuda.synchronize()
        err = check(out, want)
    except Exception as why:  # noqa: BLE001  (e.g. a host sync inside the capture)
        torch.cuda.synchronize()
        return {"status": "unavailable", "reason": f"capture failed: {type(why).__name__}: {why}"[:500]}
    if not err <= TOL[dtype]:
        return {"status": "wrong", "rel_err_vs_uncaptured": err, "reason": f"replay differs: {err:.3g}"}
    q = common.quantiles(common.time_ms(graph.replay, device, cfg.profile.warmup_ms, cfg.profile.rep_ms))
    del graph
    return {"status": "ok", "rel_err_vs_uncaptured": err, **q, "tokens_per_s": tokens / (q["ms_p50"] * 1e-3)}


def gpu_kernels(fn, device) -> dict:
    """The summed time of the GPU work (kernels, copies, memsets) one call issues, and how many: in
    eager transformers a small step is host-bound, and this is the device's share of it."""
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize()
    with warnings.catch_warnings():  # "Profiler clears events at the end of each cycle": one cycle here
        warnings.simplefilter("ignore", UserWarning)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    ops = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"gpu_kernel_ms": sum(e.device_time for e in ops) / 1e3, "gpu_ops": len(ops)}


def run(cfg, spec, device, dtype, seed, prov, ceilings, progress) -> list[dict]:
    if spec.name != "mixtral_8x7b":
        raise SystemExit(f"experiment=hf_model builds transformers' Mixtral; model={spec.name} has another "
                         "architecture (use model=mixtral_8x7b)")
    s = settings(cfg)
    model = build_model(spec, s, device, dtype, seed)
    attn = model.config._attn_implementation
    import transformers  # its version is part of what was measured
    g = torch.Generator().manual_seed(seed)

    def ids(*shape):
        return torch.randint(0, s.vocab, shape, generator=g).to(device)

    rows = []

    def record(phase, tokens, context, impl, result):
        if impl == "grouped_mm" and result["status"] == "ok":
            result["kernel"] = grouped_mm_kernel(model)
        rows.append(dict(experiment="hf_model", model=spec.name, layers=s.layers, dtype=str(dtype).split(".")[-1],
                         phase=phase, tokens=tokens, context=context, impl=impl, attn_implementation=attn,
                         hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                         num_experts=spec.num_experts, top_k=spec.top_k, heads=s.heads, kv_heads=s.kv_heads,
                         vocab=s.vocab, transformers=transformers.__version__, **result, **prov))
        progress.step(f"{phase} tokens={tokens} {impl}: {result['status']}"
                      + (f" {result['ms_p50']:.3f} ms" if result["status"] == "ok" else ""))

    with torch.no_grad():
        for P in s.prefill_tokens:
            prompt = ids(1, P)
            full = lambda: model(input_ids=prompt, use_cache=False).logits  # noqa: E731
            timed = lambda: model(input_ids=prompt, use_cache=False, logits_to_keep=1).logits  # noqa: E731
            set_impl(model, "eager")
            ref = full()
            for impl, result in measure(model, s.impls, full, timed, ref, cfg, device, dtype, P).items():
                record("prefill", P, 0, impl, result)
            for impl in s.graph_impls:
                record("prefill_graph", P, 0, impl, measure_graph(model, impl, timed, cfg, device, dtype, P))
            del ref

        for B in s.decode_batch:
            C = s.context
            set_impl(model, "eager")
            cache = model(input_ids=ids(B, C), use_cache=True, logits_to_keep=1).past_key_values
            new = ids(B, 1)
            saved = [(layer.keys, layer.values) for layer in cache.layers]

            def step():
                try:
                    return model(input_ids=new, past_key_values=cache, use_cache=True).logits
                finally:  # back to the C prefilled tokens: every call sees the same cache
                    for layer, (k, v) in zip(cache.layers, saved):
                        layer.keys, layer.values = k, v
            ref = step()
            for impl, result in measure(model, s.impls, step, step, ref, cfg, device, dtype, B).items():
                record("decode", B, C, impl, result)
            # Captured, the step reads the saved prefill K/V and writes its new K/V into the graph's
            # own memory, so every replay is the same decode step (the reset above ran at capture).
            for impl in s.graph_impls:
                record("decode_graph", B, C, impl, measure_graph(model, impl, step, cfg, device, dtype, B))
            assert cache.get_seq_length() == C, "a decode step left the cache changed"
            del cache, saved, ref
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def summary(rows: list[dict]) -> str:
    """Median ms per (phase, tokens) and implementation, tritonmoe's speedup (other ms / tritonmoe ms);
    on a GPU the same for the summed kernel times of one call."""
    tables = [_table(rows, "ms_p50", "ms per call (median)")]
    if any("gpu_kernel_ms" in r for r in rows):
        tables.append(_table(rows, "gpu_kernel_ms", "GPU kernel ms in one call (the rest of a call is host time)"))
    return "\n\n".join(tables)


def _table(rows, field, title) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = [title, f"{'phase':8s} {'tokens':>6s} {'ctx':>5s} " + " ".join(f"{i[:12]:>12s}" for i in impls)
             + f" {'vs grouped_mm':>13s} {'vs eager':>9s}"]
    for key in dict.fromkeys((r["phase"], r["tokens"], r["context"]) for r in rows):
        cell = {r["impl"]: r for r in rows if (r["phase"], r["tokens"], r["context"]) == key}
        ms = {i: r[field] for i, r in cell.items() if r["status"] == "ok" and field in r}
        cells = [f"{ms[i]:12.3f}" if i in ms else f"{cell[i]['status'] if i in cell else '-':>12s}" for i in impls]
        speed = [f"{ms[o] / ms['tritonmoe']:{w}.2f}x" if o in ms and "tritonmoe" in ms else f"{'-':>{w + 1}s}"
                 for o, w in (("grouped_mm", 12), ("eager", 8))]
        lines.append(f"{key[0]:8s} {key[1]:6d} {key[2]:5d} " + " ".join(cells) + " " + " ".join(speed))
    return "\n".join(lines)
