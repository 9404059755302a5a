"""tritonmoe: the Mixture-of-Experts forward pass in pure Triton.

    weights, ids = tritonmoe.route(tritonmoe.router_logits(x, router_weight), tritonmoe.specs.MIXTRAL_8X7B)
    out = tritonmoe.fused_experts(x, w13, w2, weights, ids)

Stages (each callable on its own): ``router_logits`` -> ``route`` -> ``build_schedule`` ->
``gate_up_silu`` (fused) or ``permute`` + ``grouped_gemm`` x2 + ``silu_mul`` (unfused) ->
``grouped_gemm`` (down) -> ``combine``. ``tritonmoe.reference`` holds the PyTorch oracle of each.

Without a visible CUDA device, kernels run through Triton's CPU interpreter: importing
tritonmoe then sets TRITON_INTERPRET=1 unless it is already set.
"""
import os as _os
import sys as _sys

import torch as _torch

if not _torch.cuda.is_available() and _os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    if "triton" in _sys.modules:
        # triton's own @jit library functions (tl.sigmoid, tl.max, ...) were already built for
        # compilation; the interpreter cannot call them.
        raise ImportError("no GPU is visible, so tritonmoe runs through Triton's interpreter, but triton was "
                          "imported first without TRITON_INTERPRET=1: import tritonmoe before triton, or set "
                          "TRITON_INTERPRET=1 in the environment")
    _os.environ["TRITON_INTERPRET"] = "1"

from . import ops, reference, specs  # noqa: E402  (ops registers torch.ops.tritonmoe.fused_experts)
from .configs import TileConfig, get_tiles  # noqa: E402
from .functional import fused_experts  # noqa: E402
from .gemm import gate_up_silu, grouped_gemm, silu_mul  # noqa: E402
from .layer import MoELayer  # noqa: E402
from .permute import combine, permute  # noqa: E402
from .route import route  # noqa: E402
from .router import router_logits  # noqa: E402
from .schedule import Schedule, build_schedule, slot_schedule  # noqa: E402
from .specs import ModelSpec  # noqa: E402

__version__ = "0.1.0"
__all__ = ["router_logits", "route", "fused_experts", "MoELayer", "ModelSpec", "specs", "reference", "build_schedule",
           "slot_schedule", "Schedule", "gate_up_silu", "grouped_gemm", "silu_mul", "permute", "combine", "TileConfig",
           "get_tiles", "ops"]
