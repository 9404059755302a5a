"""Small shared helpers: argument checks and the interpreter switch."""
from __future__ import annotations

import functools
import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache  # Triton reads the variable once, when a kernel is decorated; so does this
def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 3 under the interpreter, which runs programs one after
    another (a few persistent programs there still walk many tiles each)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


def cdiv(a: int, b: int) -> int:
    # on the host instead of triton.cdiv, a constexpr_function in Triton 3.6 whose call wrapper costs
    # ~5 us (small-T forwards are bound by host time; PERF_LOG v16)
    return -(-a // b)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {names}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if t.device.type == "cpu" and not interpreting():
        raise RuntimeError(f"{name} is on the CPU: tritonmoe runs CPU tensors only through Triton's interpreter; "
                           "set TRITON_INTERPRET=1 before importing tritonmoe (it is set for you when no GPU "
                           "is visible)")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {t.device}; tritonmoe runs on CUDA devices and on the CPU interpreter")


def check_matmul_dtype(name: str, dtype: torch.dtype) -> None:
    """bfloat16 matmuls are wrong under Triton's CPU interpreter (tl.dot on bf16 tiles returns
    garbage, seen with triton 3.6 and 3.9): refuse them there rather than return wrong numbers."""
    if dtype == torch.bfloat16 and interpreting():
        raise TypeError(f"{name} is bfloat16, which Triton's CPU interpreter multiplies wrongly; use float32 or "
                        "float16 on the CPU (bfloat16 runs on the GPU)")


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs keep float32 accuracy (IEEE), as torch.matmul does by default; the
    # 16-bit types ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"
