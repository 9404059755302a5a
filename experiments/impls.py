"""The implementations the benchmarks compare, each one MoE layer forward of the routed
experts *including* the router matmul and the model's routing, from the same inputs.

``IMPLS[name](problem)`` returns a zero-argument callable producing (T, H) (router matmul,
routing, experts); ``EXPERTS[name](problem)`` the experts alone given a routing. Either raises
``Unavailable`` with the reason (e.g. Megablocks not installed).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F_

import tritonmoe
from tritonmoe.configs import get_chunk_tokens, get_tiles
from tritonmoe.specs import ModelSpec


class Unavailable(RuntimeError):
    """This implementation cannot run here (the reason is recorded in the results)."""


@dataclass
class Problem:
    spec: ModelSpec
    x: torch.Tensor              # (T, H)
    router_weight: torch.Tensor  # (E, H)
    bias: torch.Tensor | None    # (E,) float32 correction bias (DeepSeek-V3)
    w13: torch.Tensor            # (E, 2F, H)
    w2: torch.Tensor             # (E, H, F)

    def router_logits(self) -> torch.Tensor:
        dtype = torch.float32 if self.spec.router_fp32 else self.x.dtype
        return self.x.to(dtype) @ self.router_weight.to(dtype).T


def torch_route(logits: torch.Tensor, spec: ModelSpec, bias):
    """The model's routing in PyTorch ops, as Hugging Face transformers writes it (topk-based)."""
    logits = logits.float()
    scores = torch.softmax(logits, -1) if spec.scoring == "softmax" else torch.sigmoid(logits)
    select = scores if bias is None else scores + bias
    if spec.n_group > 1:
        T = select.shape[0]
        group_scores = select.view(T, spec.n_group, -1).topk(spec.group_score_topk, -1).values.sum(-1)
        kept = group_scores.topk(spec.topk_group, -1).indices
        mask = torch.zeros(T, spec.n_group, dtype=torch.bool, device=select.device).scatter_(1, kept, True)
        select = select.masked_fill(~mask.repeat_interleave(spec.group_size, 1), float("-inf"))
    ids = select.topk(spec.top_k, -1).indices
    weights = scores.gather(1, ids)
    if spec.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * spec.routed_scaling_factor, ids


# Each implementation's experts, given the routing: ``EXPERTS[name](problem)`` returns
# ``experts(topk_weights, topk_ids) -> (T, H)``. The skew experiment calls these directly.

def tritonmoe_experts(p: Problem, fused: bool = True, schedule: str = "expert_groups"):
    return lambda weights, ids: tritonmoe.fused_experts(p.x, p.w13, p.w2, weights, ids, fused=fused,
                                                        schedule=schedule)


def tritonmoe_fixed_experts(p: Problem):
    """The preprint's schedule: groups of group_m consecutive M-blocks, across experts."""
    return tritonmoe_experts(p, schedule="fixed")


def tritonmoe_tail_tiles_experts(p: Problem):
    """Each expert's last, partial M-block with the smallest tile height that holds its rows."""
    return tritonmoe_experts(p, schedule="tail_tiles")


def tuned_tiles(spec, T: int, dtype, device):
    """(chunk_tokens, (gate_up, down) tiles): what the forward takes from the tuned table for ``spec``'s shape at
    T tokens (the chunk's bucket where the table chunks the shape)."""
    args = (spec.num_experts, spec.intermediate_size, spec.hidden_size, dtype, device)
    chunk = get_chunk_tokens(T, *args)
    return chunk, get_tiles(min(T, chunk or T), spec.top_k, *args)


def _tuned_with(p: Problem, change):
    """tritonmoe_fused's experts with its tuned tiles passed through ``change(tiles, gemm) -> tiles``; chunked where
    the table chunks the shape."""
    x = p.x
    chunk, (gate_up, down) = tuned_tiles(p.spec, x.shape[0], x.dtype, x.device)
    tiles = (change(gate_up, "gate_up"), change(down, "down"))
    return lambda weights, ids: tritonmoe.fused_experts(x, p.w13, p.w2, weights, ids, tiles=tiles, chunk_tokens=chunk)


def tritonmoe_atomic_combine_experts(p: Problem):
    """The tuned tiles, except that the down projection adds its weighted rows into the output with atomic adds
    (``TileConfig.atomic_combine``) instead of writing them for ``combine``."""
    return _tuned_with(p, lambda t, gemm: dataclasses.replace(t, atomic_combine=gemm == "down"))


def tritonmoe_swap_ab_experts(p: Problem):
    """The tuned tiles with ``swap_ab`` (tiles under 64 rows as the transposed product) and tail tiles down to 16
    rows (``min_block_m``; not for persistent tiles, which run full-height tiles only)."""
    return _tuned_with(p, lambda t, gemm: dataclasses.replace(t, swap_ab=True, min_block_m=t.min_block_m if t.persistent
                                                              else min(16, t.block_m)))


def tritonmoe_unfused_experts(p: Problem):
    return tritonmoe_experts(p, fused=False)


def torch_loop_experts(p: Problem):
    """Per-expert loop, as transformers' "eager" experts: one gather, three matmuls, one index_add per hit expert."""
    F = p.spec.intermediate_size

    def experts(weights, ids):
        out = torch.zeros_like(p.x, dtype=torch.float32)
        hit = torch.bincount(ids.flatten(), minlength=p.spec.num_experts).nonzero().flatten().tolist()
        for e in hit:
            tok, j = torch.where(ids == e)
            h = p.x[tok] @ p.w13[e].T
            y = (F_.silu(h[:, :F]) * h[:, F:]) @ p.w2[e].T
            out.index_add_(0, tok, y.float() * weights[tok, j, None])
        return out.to(p.x.dtype)
    return experts


def torch_grouped_mm_experts(p: Problem):
    """argsort -> gather -> torch._grouped_mm (w13) -> silu*up -> torch._grouped_mm (w2) -> weighted
    index_add_ (what transformers' "grouped_mm" experts do)."""
    if not hasattr(torch, "_grouped_mm"):
        raise Unavailable(f"torch {torch.__version__} has no torch._grouped_mm")
    if p.x.device.type != "cuda" or p.x.dtype != torch.bfloat16:
        raise Unavailable("torch._grouped_mm runs bf16 on CUDA")
    E, F, k = p.spec.num_experts, p.spec.intermediate_size, p.spec.top_k
    w13_t, w2_t = p.w13.transpose(1, 2), p.w2.transpose(1, 2)   # (E, H, 2F), (E, F, H) views

    def experts(weights, ids):
        flat = ids.flatten().long()
        order = torch.argsort(flat, stable=True)
        tok = order // k
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
        h = torch._grouped_mm(p.x[tok], w13_t, offs=offs)
        y = torch._grouped_mm(F_.silu(h[:, :F]) * h[:, F:], w2_t, offs=offs)
        out = torch.zeros(p.x.shape, dtype=torch.float32, device=p.x.device)
        out.index_add_(0, tok, y.float() * weights.flatten()[order, None])
        return out.to(p.x.dtype)
    return experts


_MEGABLOCKS_LAYERS: dict = {}  # the benchmarks reuse one set of weights for every T: build the copy once


def _megablocks_layer(p: Problem, Arguments, dMoE):
    """dMoE with the problem's weights. Built on the CPU and moved: its constructor makes
    transposed temporaries that, for DeepSeek-V3, do not fit beside the problem on an 80 GB GPU."""
    s = p.spec
    E, F, H = s.num_experts, s.intermediate_size, s.hidden_size
    args = Arguments(hidden_size=H, ffn_hidden_size=F, moe_num_experts=E, moe_top_k=s.top_k, mlp_type="glu",
                     mlp_impl="grouped", bf16=p.x.dtype == torch.bfloat16, fp16=p.x.dtype == torch.float16,
                     bias=False, return_bias=False, activation_fn=F_.silu, device=torch.device("cpu"),
                     init_method=lambda w: w, output_layer_init_method=lambda w: w)
    layer = dMoE(args).eval()
    with torch.no_grad():
        mlp = layer.experts.mlp
        for name, w in (("w1", p.w13[:, :F]), ("v1", p.w13[:, F:]), ("w2", p.w2.transpose(1, 2))):
            getattr(mlp, name).copy_(w.reshape(E * F, H).cpu())
    return layer.to(p.x.device)


def megablocks_experts(p: Problem):
    """Megablocks dMoE experts (mlp_type="glu", mlp_impl="grouped"), fed the given routing (its own
    router is plain softmax-top-k and cannot express DeepSeek-V3's)."""
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except ImportError as err:
        raise Unavailable(f"megablocks is not installed ({err}); see experiments/README.md") from None
    if p.x.device.type != "cuda":
        raise Unavailable("megablocks runs on CUDA only")
    key = (p.spec.name, p.spec.num_experts, p.w13.data_ptr(), p.w2.data_ptr())
    if key not in _MEGABLOCKS_LAYERS:
        _MEGABLOCKS_LAYERS.clear()  # one copy at a time: DeepSeek-V3's is 22 GB
        _MEGABLOCKS_LAYERS[key] = _megablocks_layer(p, Arguments, dMoE)
    layer = _MEGABLOCKS_LAYERS[key]
    return lambda weights, ids: layer.experts(p.x, None, weights.to(p.x.dtype), ids)


EXPERTS = {
    "tritonmoe_fused": tritonmoe_experts,
    "tritonmoe_fixed": tritonmoe_fixed_experts,
    "tritonmoe_tail_tiles": tritonmoe_tail_tiles_experts,
    "tritonmoe_atomic_combine": tritonmoe_atomic_combine_experts,
    "tritonmoe_swap_ab": tritonmoe_swap_ab_experts,
    "tritonmoe_unfused": tritonmoe_unfused_experts,
    "torch_loop": torch_loop_experts,
    "torch_grouped_mm": torch_grouped_mm_experts,
    "megablocks": megablocks_experts,
}


def _forward(name: str):
    """The whole layer forward of an implementation: router matmul and the model's routing (tritonmoe's
    own kernels for tritonmoe, PyTorch ops for the others), then its experts."""
    def make(p: Problem):
        experts = EXPERTS[name](p)
        if name.startswith("tritonmoe"):
            fp32 = p.spec.router_fp32
            return lambda: experts(*tritonmoe.route(tritonmoe.router_logits(p.x, p.router_weight, float32=fp32),
                                                    p.spec, correction_bias=p.bias))
        return lambda: experts(*torch_route(p.router_logits(), p.spec, p.bias))
    return make


IMPLS = {name: _forward(name) for name in EXPERTS}
