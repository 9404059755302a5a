"""Probe: the forward's front end at large T -- router matmul, routing, schedule (PERF_LOG v20).

``probe_decode --points`` showed these three taking 1.1 ms of DeepSeek-V3's 13.4 ms forward at T = 8192 (the
float32 router matmul through PyTorch: an upcast of the tokens and a float32 GEMM, 1066 us; the schedule's
one-program scan, 240 us; the routing kernel, 64 us) and 67 us of Qwen2's 3.3 ms at T = 4096. Each piece is
timed here alone (device events, L2 cleared before each call), on the models' shapes with random inputs:

* ``router``: ``tritonmoe.router_logits`` (float32 logits of bf16 inputs on the tensor cores, DeepSeek-V3)
  at its shipped tile (``router._mma_tile``) and at other (tokens, experts) tiles, against the models'
  PyTorch expression (``x.float() @ w.float().T``); each output's relative error to PyTorch's recorded;
* ``route``: the routing kernel at its shipped tile (``route._tile``) and at other (tokens per program,
  warps) choices: one warp for a tile of 256, 512 or 1024 (token, expert) elements, and four warps for 4096;
  weights and ids compared with the shipped tile's;
* ``schedule``: ``build_schedule`` with the gate+up's tuned block map.

    python -m experiments.probe_front            # -> results/<GPU>/probe_front.jsonl
"""
from __future__ import annotations

import importlib

import torch

from tritonmoe import build_schedule, route as route_fn, router_logits
from tritonmoe.configs import get_tiles
from tritonmoe.router import _mma_tile, _router_mma
from tritonmoe.specs import get_spec
from tritonmoe._utils import next_pow2, num_sms
from . import common

MODELS = ("mixtral_8x7b", "qwen2_57b_a14b", "deepseek_v3")
TOKENS = (32, 128, 512, 2048, 4096, 8192)
ROUTER_TILES = ((128, 128), (64, 128), (32, 128), (64, 64), (32, 64), (16, 64), (32, 32), (16, 32), (16, 16))
ROUTE_ELEMENTS = ((256, 1), (512, 1), (1024, 1), (4096, 4))  # (tile elements, warps) besides the shipped one
SEED = 0
WARMUP_MS, REP_MS = 25, 200
KEY = ("experiment", "model", "T", "stage", "variant", "commit")
route_module = importlib.import_module("tritonmoe.route")  # the module (the package exports its function as route)


def _time(fn, dev) -> dict:
    return common.quantiles(common.time_ms(fn, dev, WARMUP_MS, REP_MS))


def _route_variants(T: int, E: int) -> dict:
    e_pad = next_pow2(E)
    shipped = route_module._tile(T, e_pad)
    variants = {f"shipped {shipped[0]}x{shipped[1]}w": shipped}
    for elements, warps in ROUTE_ELEMENTS:
        block_t = max(1, min(next_pow2(T), elements // e_pad))
        if (block_t, warps) != shipped and block_t * e_pad >= 32 * warps:
            variants[f"{block_t}x{warps}w"] = (block_t, warps)
    return variants


def main() -> None:
    dev = torch.device("cuda")
    prov = common.provenance(dev, SEED)
    rows = []
    g = torch.Generator(device=dev).manual_seed(SEED)
    for name in MODELS:
        spec = get_spec(name)
        E, H, F, k = spec.num_experts, spec.hidden_size, spec.intermediate_size, spec.top_k
        w = (torch.randn(E, H, generator=g, device=dev) * H ** -0.5).to(torch.bfloat16)
        bias = (torch.randn(E, generator=g, device=dev) * 0.05) if spec.uses_correction_bias else None
        for T in TOKENS:
            x = torch.randn(T, H, generator=g, device=dev).to(torch.bfloat16)
            base = {**prov, "experiment": "probe_front", "model": name, "T": T}
            point = []
            fp32 = spec.router_fp32
            logits = router_logits(x, w, float32=fp32)
            if fp32:
                torch_logits = x.float() @ w.float().T
                shipped = _mma_tile(T, E, num_sms(dev))
                variants = {f"tritonmoe {shipped[0]}x{shipped[1]}": lambda: router_logits(x, w, float32=True),
                            "torch_fp32": lambda: x.float() @ w.float().T}
                for tile in ROUTER_TILES:
                    if tile != shipped and tile[1] <= max(16, E):
                        variants[f"tile {tile[0]}x{tile[1]}"] = lambda tile=tile: _router_mma(x, w, tile)
                for variant, fn in variants.items():
                    out = fn()
                    err = ((out - torch_logits).norm() / torch_logits.norm()).item()
                    point.append({**base, "stage": "router", "variant": variant, "rel_err": err, **_time(fn, dev)})
            ref_w, ref_i = route_fn(logits, spec, correction_bias=bias)
            shipped_tile = route_module._tile
            for variant, tile in _route_variants(T, E).items():
                route_module._tile = lambda T_, e_pad_, tile=tile: tile
                try:
                    wts, ids = route_fn(logits, spec, correction_bias=bias)
                    same = bool(torch.equal(ids, ref_i) and torch.allclose(wts, ref_w, rtol=1e-6, atol=0))
                    t = _time(lambda: route_fn(logits, spec, correction_bias=bias), dev)
                finally:
                    route_module._tile = shipped_tile
                point.append({**base, "stage": "route", "variant": variant, "block_t": tile[0], "warps": tile[1],
                             "same_as_shipped": same, **t})
            up_t, _ = get_tiles(T, k, E, F, H, torch.bfloat16, dev)
            point.append({**base, "stage": "schedule", "variant": f"block_m={up_t.block_m},absorb_m={up_t.absorb_m}",
                          **_time(lambda: build_schedule(ref_i, E, *up_t.block_map), dev)})
            rows += point
            for r in point:
                print(f"{name:16s} T={T:5d} {r['stage']:8s} {r['variant']:28s} {1e3 * r['ms_p50']:8.1f} us"
                      + ("" if r.get("same_as_shipped", True) else "  DIFFERS"), flush=True)
            del x
    path = common.REPO / "results" / common.device_name(dev) / "probe_front.jsonl"
    common.write_rows(path, rows, KEY)
    print(f"{len(rows)} rows -> {path.relative_to(common.REPO)}")


if __name__ == "__main__":
    main()
