"""Kernel launches with less host time: small-T forwards are bound by it.

``kernel[grid](...)`` spends most of its host time binding and specialising every argument
and hashing a cache key before the compiled kernel's own C launcher runs
(``experiments/host_overhead.py`` measures both). ``launch`` keeps the compiled kernel of
each argument signature and calls its launcher directly. The signature is a superset of
what Triton specialises on, so a cached kernel is never used where Triton would have
compiled another: constexprs by value; per tensor its dtype and 16-byte alignment; per int
whether it is 1, divisible by 16 and fits int32 or int64; per tensor descriptor its dtype,
block shape, padding and the same for its shape and strides; anything else by value. The
first call of a signature goes through ``kernel[grid]``, as does every call under the
interpreter, with Triton's launch hooks set (profilers) or with a Triton whose launcher this
was not checked against (``DIRECT_TRITON``).

Programmatic dependent launch (Hopper and later): a kernel whose last parameter is ``USE_GDC`` gets it
from here, and is launched with ``launch_pdl`` where the GPU has it, so its programs may start while the
previous kernel's last ones still run. Such a kernel calls ``await_previous(USE_GDC)`` before it reads
anything: it waits there until the previous kernel has finished and its writes are visible, then lets
the next kernel launch. The forward is a chain of short kernels at small T, each of which otherwise starts
only after the previous one has drained (PERF_LOG v20). ``PDL = False`` turns it off (A/B).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

from ._utils import interpreting

__all__ = ["launch", "await_previous"]

# Triton versions whose CompiledKernel.run(grid..., stream, function, packed_metadata,
# launch_metadata, enter_hook, exit_hook, *args) this was checked against (an internal API).
DIRECT_TRITON = ("3.6.",)
_direct = triton.__version__.startswith(DIRECT_TRITON)
_compiled: dict = {}   # (kernel, device, options, argument signature) -> CompiledKernel
_constexprs: dict = {}  # kernel -> which of its parameters are constexprs (keyed by value)


def _int(a: int) -> tuple:
    return (a == 1, a % 16 == 0, -2**31 <= a < 2**31, a < 2**63)


def _other(a) -> tuple:
    if isinstance(a, TensorDescriptor):
        b = a.base
        return (b.dtype, b.data_ptr() % 16 == 0, tuple(map(_int, a.shape)), tuple(map(_int, a.strides)),
                tuple(a.block_shape), a.padding)
    return (type(a), a)  # None, bool, float, str: by value (floats are never specialised; kept exact anyway)


def _signature(kernel, args) -> tuple:
    constexpr = _constexprs.get(kernel)
    if constexpr is None:
        constexpr = _constexprs[kernel] = tuple(p.is_constexpr for p in kernel.params)
    # one comprehension, the common cases inline (ints as in _int): this runs on every launch
    return tuple([(a,) if c else
                  (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else
                  (a == 1, a % 16 == 0, -2**31 <= a < 2**31, a < 2**63) if type(a) is int else _other(a)
                  for a, c in zip(args, constexpr)])


def _hooked(hook) -> bool:
    # Triton 3.6's launch hooks are HookChains, empty unless a profiler added a hook
    return bool(getattr(hook, "calls", hook))


# debug=True kernels (the schedule's, kept for its device-side check of expert ids) would also get
# an overflow check on every int32 add, sub and mul: 3.7x the PTX of the one-launch schedule.
OPTIONS = dict(sanitize_overflow=False)


PDL = True  # programmatic dependent launch where the GPU has it (compute capability 9.0+)


@triton.jit
def await_previous(USE_GDC: tl.constexpr):
    """At a kernel's start, before it reads anything an earlier kernel wrote: with programmatic dependent
    launch, wait for the previous kernel to finish (its writes visible), then let the next one launch.
    Every program of every such kernel waits here, so each kernel also finishes after its predecessor."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def _has_pdl(device: int) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


@functools.lru_cache(maxsize=None)
def _takes_gdc(kernel) -> bool:
    return kernel.arg_names[-1] == "USE_GDC"


def launch(kernel, grid: tuple, args: tuple, *, num_warps: int = 4, num_stages: int = 3,
           dependent: bool = True) -> None:
    """``kernel[grid](*args, num_warps=..., num_stages=...)``, where ``args`` are ALL of the kernel's
    parameters, constexprs included, in signature order (what the compiled launcher takes), less a last
    ``USE_GDC``, which this adds (programmatic dependent launch: see the module's docstring).

    ``dependent=False``: launched as without it, once the previous kernel has finished. For a persistent grid
    (one program per SM, each walking a fixed share of the tiles): launched early, DeepSeek-V3 T = 8192's
    persistent gate+up took 15.4 ms against 8.8 without (PERF_LOG v21; the cause was not isolated: how the
    early-launched programs were placed on the SMs is the suspect, not measured)."""
    interpret = interpreting()
    device = None if interpret else torch.cuda.current_device()
    pdl = False
    if _takes_gdc(kernel):
        pdl = dependent and PDL and not interpret and _has_pdl(device)
        args = (*args, pdl)
    if not _direct or interpret or _hooked(knobs.runtime.launch_enter_hook) or \
            _hooked(knobs.runtime.launch_exit_hook):
        kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl, **OPTIONS)
        return
    key = (kernel, device, num_warps, num_stages, knobs.runtime.debug, _signature(kernel, args))
    compiled = _compiled.get(key)
    if compiled is None:
        if len(args) != len(kernel.params):
            raise TypeError(f"launch({kernel.fn.__name__}): {len(args)} arguments for {len(kernel.params)} parameters")
        _compiled[key] = kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl, **OPTIONS)
        return
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], g1, g2, driver.active.get_current_stream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *args)
