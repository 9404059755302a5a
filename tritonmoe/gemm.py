"""Stages 3-4 -- block-scheduled grouped GEMMs over the expert-sorted rows.

Each program takes one M-block of the schedule (one expert, up to BLOCK_M sorted rows)
and one BLOCK_N slice of the output columns.

* ``gate_up_silu``: the fused first GEMM. Rows [0, F) of ``w13[e]`` (gate) and [F, 2F)
  (up) are multiplied against the same input tiles, and ``silu(gate) * up`` is formed in
  registers: the gate and up outputs never reach memory. With TMA weight tiles the gate and up
  rows of the same columns arrive as one tile (a 3-D box over w13 seen as (2E, F, H)) and meet
  the input tile in one dot of 2 * BLOCK_N columns, split in the epilogue; otherwise two dots.
  Input rows are gathered from token order through the schedule (no permuted copy).
* ``grouped_gemm``: one projection ``a[rows] @ w[e, n_offset:n_offset+N, :]^T``. The
  unfused pipeline uses it for gate and for up; both pipelines use it for the down
  projection, where the epilogue multiplies by the routing weight and writes each row to
  its slot (token order), ready for ``tritonmoe.combine``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._launch import await_previous, launch
from ._utils import cdiv, check_matmul_dtype, dot_precision, num_sms
from .permute import permute
from .schedule import Schedule

__all__ = ["gate_up_silu", "grouped_gemm", "silu_mul"]

# SCATTER_WEIGHTED: where the down projection's weighted rows go
WRITE_SLOT_ROWS = tl.constexpr(1)  # each at its slot's row of a (T*k, n) result, summed by ``combine``
ADD_TOKEN_ROWS = tl.constexpr(2)   # added into its token's row of a zeroed (T, n) output (TileConfig.atomic_combine)


@triton.jit(do_not_specialize=["max_blocks"])  # it changes with T: no recompiles for its divisibility
def _expert_gemm_kernel(
    # pointers
    a_ptr, w_ptr, out_ptr, sorted_slots_ptr, topk_weights_ptr, block_expert_ptr, block_row_ptr,
    block_rank_ptr, block_siblings_ptr, expert_offsets_ptr, num_blocks_ptr, num_busy_ptr,
    w_desc,                          # WEIGHT_TMA: a tensor descriptor over w as (E * rows, K), else None
    a_desc,                          # A_TMA: a tensor descriptor over a (sorted rows, K), else None
    # sizes
    N, K, TOP_K, n_offset, up_offset, max_blocks, k_per_split, num_experts,
    # strides
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    # meta-parameters
    GATHER_A: tl.constexpr,          # a is in token order: row of sorted row i is sorted_slots[i] // TOP_K
    GATE_UP_SILU: tl.constexpr,      # also multiply rows up_offset + n, and keep silu(gate) * up
    SCATTER_WEIGHTED: tl.constexpr,  # scale by the slot's routing weight, then WRITE_SLOT_ROWS: write it at the slot's
                                     # row; ADD_TOKEN_ROWS: add it into its token's row with atomics (0: neither)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EXPERT_GROUPS: tl.constexpr,     # a group of M-blocks never spans two experts (else GROUP_M consecutive blocks)
    MIN_BLOCK_M: tl.constexpr,       # smallest tile height for an expert's last, partial M-block
    ABSORB_M: tl.constexpr,          # an expert's last whole M-block also takes up to this many more rows (0: off)
    EVEN_K: tl.constexpr,            # every K slice is whole BLOCK_Ks: no K mask, so loads stay 16-byte wide
    DOT_PRECISION: tl.constexpr,
    WEIGHT_TMA: tl.constexpr,        # weight tiles through the copy engine (Hopper's TMA) instead of pointers
    A_TMA: tl.constexpr,             # input tiles too (rows in sorted order, full-height tiles only)
    PERSISTENT: tl.constexpr,        # one program per SM walks the used tiles (full-height tiles only)
    SWEEP_N: tl.constexpr,           # N-tiles per sweep over all M-blocks (0: all of N in one sweep)
    SLOT_BLOCKS: tl.constexpr,       # a slot schedule: M-block b is slot b (one row), expert block_expert[b] = topk_ids
    GATE_UP_BOX: tl.constexpr,       # GATE_UP_SILU with w_desc a (2E, F, K) view: gate and up tiles in one box, one dot
    SWAP_AB: tl.constexpr,           # tiles under 64 rows (one program each) compute the transposed product
    INTERLEAVE: tl.constexpr,        # tiles taken from the two ends of the (busy-first) block list in proportion
    USE_GDC: tl.constexpr,           # programmatic dependent launch (set by _launch.launch)
):
    await_previous(USE_GDC)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if SLOT_BLOCKS:
        # max_blocks = T*k blocks, N-tile major: the programs of one N-tile run together, so slots
        # that share an expert read its weight tile at once (L2) instead of apart.
        pid_m = tl.program_id(0) % max_blocks
        pid_n = tl.program_id(0) // max_blocks
        expert = tl.load(block_expert_ptr + pid_m)                                  # int32 or int64 id
        in_range = (expert >= 0) & (expert < num_experts)
        tl.device_assert(in_range, "tritonmoe: topk_ids has an expert id outside [0, num_experts)")
        if in_range:  # checked before narrowing; were the assertion compiled out, a bad id would read nothing
            _expert_tile(a_ptr, a_desc, w_ptr, w_desc, out_ptr, sorted_slots_ptr, topk_weights_ptr,
                         expert.to(tl.int32), pid_m, pid_m + 1, pid_n, N, K, TOP_K, n_offset, up_offset, k_per_split,
                         stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on, GATHER_A,
                         GATE_UP_SILU, SCATTER_WEIGHTED, BLOCK_M, 0, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION,
                         WEIGHT_TMA, False, True, GATE_UP_BOX, False)
    elif PERSISTENT:
        # The tiles of the used M-blocks (their count is on the device), grid-strided over the programs;
        # consecutive tiles' K loops run as one pipelined loop, so one tile's epilogue can overlap the
        # next's loads. On the H100: slower than one program per tile with two gate+up dots (PERF_LOG v11);
        # with one dot 0-5 % faster where little is padded (v19).
        used = tl.load(num_blocks_ptr)
        if INTERLEAVE:
            one_block_tiles = (used - tl.load(num_busy_ptr)) * num_pid_n
        for tile in tl.range(tl.program_id(0), used * num_pid_n, tl.num_programs(0), flatten=True):
            if INTERLEAVE:
                tile = _interleaved(tile, used * num_pid_n, one_block_tiles)
            pid_m, pid_n = _tile_position(tile, num_pid_n, used, block_rank_ptr, block_siblings_ptr, GROUP_M,
                                          EXPERT_GROUPS, SWEEP_N)
            expert = tl.load(block_expert_ptr + pid_m)
            _expert_tile(a_ptr, a_desc, w_ptr, w_desc, out_ptr, sorted_slots_ptr, topk_weights_ptr, expert,
                         tl.load(block_row_ptr + pid_m), tl.load(expert_offsets_ptr + expert + 1), pid_n, N, K, TOP_K,
                         n_offset, up_offset, k_per_split, stride_am, stride_ak, stride_we, stride_wn, stride_wk,
                         stride_om, stride_on, GATHER_A, GATE_UP_SILU, SCATTER_WEIGHTED, BLOCK_M, 0, BLOCK_N, BLOCK_K,
                         EVEN_K, DOT_PRECISION, WEIGHT_TMA, A_TMA, False, GATE_UP_BOX, False)
    else:
        pid = tl.program_id(0)
        if SWEEP_N > 0 or INTERLEAVE:
            # sweeps and the interleaved walk take the used M-blocks only (their count is on the device); the
            # grid's surplus exits
            used = tl.load(num_blocks_ptr)
            if pid >= used * num_pid_n:
                return
            if INTERLEAVE:
                pid = _interleaved(pid, used * num_pid_n, (used - tl.load(num_busy_ptr)) * num_pid_n)
            pid_m, pid_n = _tile_position(pid, num_pid_n, used, block_rank_ptr, block_siblings_ptr, GROUP_M,
                                          EXPERT_GROUPS, SWEEP_N)
        else:
            pid_m, pid_n = _tile_position(pid, num_pid_n, max_blocks, block_rank_ptr, block_siblings_ptr, GROUP_M,
                                          EXPERT_GROUPS, SWEEP_N)

        # The schedule: this M-block's expert (-1: unused block of the upper-bound grid) and rows.
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        row_start = tl.load(block_row_ptr + pid_m)
        row_end = tl.load(expert_offsets_ptr + expert + 1)
        # An expert's last M-block is partial. With MIN_BLOCK_M < BLOCK_M (schedule="tail_tiles") its
        # tile height is the smallest power of two (down to MIN_BLOCK_M) that holds its rows, so
        # padding costs at most half a tile; one branch per height. With MIN_BLOCK_M = BLOCK_M (the
        # default, fixed schedule) only the full-height branch is compiled. With ABSORB_M, an expert's last
        # whole block may run past BLOCK_M rows (the schedule gave the rest no block of its own): those rows
        # take an ABSORB_M-row tile of their own in the same program, against the same weight tiles.
        rows = row_end - row_start  # to the expert's end: more than BLOCK_M unless this is its last block
        height = 0  # halvings of BLOCK_M
        for h in tl.static_range(1, 5):
            if BLOCK_M >> h >= MIN_BLOCK_M:
                if rows <= BLOCK_M >> h:
                    height = h
        if ABSORB_M > 0:
            height = tl.where((rows > BLOCK_M) & (rows <= BLOCK_M + ABSORB_M), -1, height)  # the last, absorbing
        for h in tl.static_range(0, 5):
            if BLOCK_M >> h >= MIN_BLOCK_M:
                if height == h:
                    _expert_tile(a_ptr, a_desc, w_ptr, w_desc, out_ptr, sorted_slots_ptr, topk_weights_ptr, expert,
                                 row_start, row_end, pid_n, N, K, TOP_K, n_offset, up_offset, k_per_split, stride_am,
                                 stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on, GATHER_A,
                                 GATE_UP_SILU, SCATTER_WEIGHTED, BLOCK_M >> h, 0, BLOCK_N, BLOCK_K, EVEN_K,
                                 DOT_PRECISION, WEIGHT_TMA, A_TMA and h == 0, False, GATE_UP_BOX, SWAP_AB)
        if ABSORB_M > 0:
            if height == -1:
                _expert_tile(a_ptr, a_desc, w_ptr, w_desc, out_ptr, sorted_slots_ptr, topk_weights_ptr, expert,
                             row_start, row_end, pid_n, N, K, TOP_K, n_offset, up_offset, k_per_split, stride_am,
                             stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on, GATHER_A,
                             GATE_UP_SILU, SCATTER_WEIGHTED, BLOCK_M, ABSORB_M, BLOCK_N, BLOCK_K, EVEN_K,
                             DOT_PRECISION, WEIGHT_TMA, A_TMA, False, GATE_UP_BOX, False)


@triton.jit
def _interleaved(i, n, back):
    """The i-th of n tiles when the last ``back`` of them (one-block experts', from the list's end) are spread
    evenly among the others (busy experts', from its front): of the first i, floor(i * back / n) come from
    the back. A bijection on [0, n)."""
    wide = tl.cast(i, tl.int64)  # i * back may pass 2**31
    taken = (wide * back // n).to(tl.int32)              # back tiles among the first i
    from_back = ((wide + 1) * back // n).to(tl.int32) > taken
    return tl.where(from_back, n - 1 - taken, i - taken)


@triton.jit
def _tile_position(pid, num_pid_n, max_blocks, block_rank_ptr, block_siblings_ptr, GROUP_M: tl.constexpr,
                   EXPERT_GROUPS: tl.constexpr, SWEEP_N: tl.constexpr):
    """Program (or tile) index -> (M-block, N-block): a group of up to GROUP_M M-blocks sweeps N together,
    so their input rows stay in L2 and blocks of one expert share its weight tiles as they stream in.
    EXPERT_GROUPS: groups never span two experts (an expert's blocks, GROUP_M at a time), so an expert's
    weights stream from HBM once per group wherever its blocks start; consecutive groups would let a
    skewed expert's blocks straddle two groups that run apart in time.
    SWEEP_N > 0: N is swept SWEEP_N tiles at a time, every group (of max_blocks blocks: the used ones)
    within one such slice before the next slice. The programs resident at once then span many groups,
    so an expert with many blocks (compute-bound tiles) runs beside experts with few (weight-bound
    tiles) instead of alone, at the price of reading every input row once per slice."""
    if SWEEP_N > 0:
        per_sweep = max_blocks * SWEEP_N
        sweep = pid // per_sweep
        pid -= sweep * per_sweep
        n_first = sweep * SWEEP_N
        num_pid_n = tl.minimum(num_pid_n - n_first, SWEEP_N)  # N-tiles of this slice
    else:
        n_first = 0
    if EXPERT_GROUPS:
        r = pid // num_pid_n  # a block of this program's group
        rank = tl.load(block_rank_ptr + r)
        first_m = r - rank % GROUP_M
        group_rows = tl.minimum(tl.load(block_siblings_ptr + r) - (rank - rank % GROUP_M), GROUP_M)
    else:
        first_m = (pid // (GROUP_M * num_pid_n)) * GROUP_M
        group_rows = tl.minimum(max_blocks - first_m, GROUP_M)
    local = pid - first_m * num_pid_n
    return first_m + local % group_rows, n_first + local // group_rows


@triton.jit
def _tile_rows(offs_m, mask_m, sorted_slots_ptr, TOP_K, GATHER_A: tl.constexpr, SCATTER_WEIGHTED: tl.constexpr,
               SLOT_ORDER: tl.constexpr):
    """Sorted rows -> (their slots, their rows of a)."""
    if SLOT_ORDER:
        slots = offs_m.to(tl.int64)
    elif GATHER_A or SCATTER_WEIGHTED:
        slots = tl.load(sorted_slots_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        slots = offs_m.to(tl.int64)  # not used
    if GATHER_A:
        a_rows = slots // TOP_K
    else:
        a_rows = offs_m.to(tl.int64)
    return slots, a_rows


@triton.jit
def _split_gate_up(acc, TILE_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(TILE_M, 2 BLOCK_N) accumulator of a gate+up box -> its (gate, up) halves."""
    return tl.split(tl.permute(tl.reshape(acc, (TILE_M, 2, BLOCK_N)), (0, 2, 1)))


@triton.jit
def _store_tile(acc, acc_up, offs_m, mask_m, slots, offs_n, mask_n, out_ptr, topk_weights_ptr, stride_om, stride_on,
                pid_k, TOP_K, GATE_UP_SILU: tl.constexpr, SCATTER_WEIGHTED: tl.constexpr):
    if GATE_UP_SILU:
        acc = acc * tl.sigmoid(acc) * acc_up                                                    # SiLU(g) * u
    if SCATTER_WEIGHTED:
        acc = acc * tl.load(topk_weights_ptr + slots, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    if SCATTER_WEIGHTED == ADD_TOKEN_ROWS:
        # the token's k rows (and split-K partials) meet in its output row, zeroed by the caller
        tokens = slots // TOP_K
        out_ptrs = out_ptr + tokens[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :],
                      sem="relaxed")
    else:
        if SCATTER_WEIGHTED == WRITE_SLOT_ROWS:
            # split-K partials of one slot sit side by side (rows slot * splits + pid_k), and
            # combine sums them with the slot's k choices: no atomics, a fixed order.
            out_rows = slots * tl.num_programs(1) + pid_k
        else:
            out_rows = offs_m.to(tl.int64)
        out_ptrs = out_ptr + out_rows[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _expert_tile(
    a_ptr, a_desc, w_ptr, w_desc, out_ptr, sorted_slots_ptr, topk_weights_ptr, expert, row_start, row_end, pid_n,
    N, K, TOP_K, n_offset, up_offset, k_per_split, stride_am, stride_ak, stride_we, stride_wn, stride_wk,
    stride_om, stride_on, GATHER_A: tl.constexpr, GATE_UP_SILU: tl.constexpr, SCATTER_WEIGHTED: tl.constexpr,
    TILE_M: tl.constexpr, EXTRA_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WEIGHT_TMA: tl.constexpr, A_TMA: tl.constexpr, SLOT_ORDER: tl.constexpr,
    GATE_UP_BOX: tl.constexpr, SWAP_AB: tl.constexpr,
):
    """One (TILE_M rows of one expert) x (BLOCK_N columns) output tile over one split-K slice, and with
    EXTRA_M > 0 the expert's rows after them (up to EXTRA_M: an absorbing block) as a second tile that
    multiplies the same weight tiles as they arrive.
    SLOT_ORDER: rows are slots (a slot schedule), else sorted rows mapped to slots by sorted_slots.
    GATE_UP_BOX: the gate and up weight tiles come as one (2, BLOCK_N, BLOCK_K) box, so each K step is
    one dot of 2 * BLOCK_N columns (Triton pipelines one wide dot better than two that share the input:
    experiments/probe_ws.py); the accumulator is split into gate and up before the epilogue.
    SWAP_AB: a tile under 64 rows (and no absorbed rows) computes (w_tile @ a_tile^T)^T: the weight tile's
    columns are the MMA's M and the rows its N, since on Hopper tl.dot is a wgmma only where M is 64+ (under
    it, the older mma.sync); the accumulator is transposed back before the epilogue."""
    pid_k = tl.program_id(1)  # split-K slice: [pid_k * k_per_split, ...) of the reduction
    offs_m = row_start + tl.arange(0, TILE_M)                                                   # [TM]
    mask_m = offs_m < row_end
    slots, a_rows = _tile_rows(offs_m, mask_m, sorted_slots_ptr, TOP_K, GATHER_A, SCATTER_WEIGHTED, SLOT_ORDER)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                            # [BN]
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    offs_k = tl.arange(0, BLOCK_K)                                                              # [BK]
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + (k_start + offs_k[None, :]) * stride_ak      # [TM, BK]
    # int64 before the expert stride: DeepSeek-V3's w13 has 7.5e9 elements.
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + (n_offset + offs_n[None, :]).to(tl.int64) * stride_wn
              + (k_start + offs_k[:, None]) * stride_wk)                                        # [BK, BN]
    # WEIGHT_TMA: row of w's (E * rows, K) view; rows past this expert's N belong to the next expert
    # (or are zero-filled past the last) and only feed output columns that are never stored.
    w_row = (expert * (stride_we // stride_wn)).to(tl.int32) + n_offset + pid_n * BLOCK_N  # E * rows < 2**31
    WIDE: tl.constexpr = 2 if GATE_UP_BOX else 1  # accumulator columns per output column
    SWAP: tl.constexpr = SWAP_AB and TILE_M < 64 and EXTRA_M == 0
    if SWAP:  # transposed: (output columns, rows)
        acc = tl.zeros((WIDE * BLOCK_N, TILE_M), dtype=tl.float32)
        acc_up = acc  # replaced where GATE_UP_SILU with two dots
        if GATE_UP_SILU and not GATE_UP_BOX:
            acc_up = tl.zeros((BLOCK_N, TILE_M), dtype=tl.float32)
    else:
        acc = tl.zeros((TILE_M, WIDE * BLOCK_N), dtype=tl.float32)
        acc_up = acc  # replaced where GATE_UP_SILU with two dots
        if GATE_UP_SILU and not GATE_UP_BOX:
            acc_up = tl.zeros((TILE_M, BLOCK_N), dtype=tl.float32)
    if EXTRA_M > 0:
        offs_x = row_start + TILE_M + tl.arange(0, EXTRA_M)                                     # [XM]
        mask_x = offs_x < row_end
        slots_x, a_rows_x = _tile_rows(offs_x, mask_x, sorted_slots_ptr, TOP_K, GATHER_A, SCATTER_WEIGHTED, False)
        a_ptrs_x = a_ptr + a_rows_x[:, None] * stride_am + (k_start + offs_k[None, :]) * stride_ak
        acc_x = tl.zeros((EXTRA_M, WIDE * BLOCK_N), dtype=tl.float32)
        acc_x_up = acc_x
        if GATE_UP_SILU and not GATE_UP_BOX:
            acc_x_up = tl.zeros((EXTRA_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = (offs_k < k_end - k0) | EVEN_K
        if A_TMA:
            # rows past row_end belong to the next expert (or are zero-filled): never stored
            a = a_desc.load([row_start, k0])
        else:
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if GATE_UP_BOX:
            # rows [gate n0 .. n0 + BN), then [up n0 .. n0 + BN): one (2 BN, BK) tile in shared memory
            w = tl.reshape(w_desc.load([2 * expert.to(tl.int32), pid_n * BLOCK_N, k0]), (2 * BLOCK_N, BLOCK_K)).T
        elif WEIGHT_TMA:
            w = w_desc.load([w_row, k0]).T  # columns past K are zero-filled by the copy engine
        else:
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if SWAP:
            acc = tl.dot(tl.trans(w), tl.trans(a), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if EXTRA_M > 0:
            a_x = tl.load(a_ptrs_x, mask=mask_x[:, None] & mask_k[None, :], other=0.0)
            acc_x = tl.dot(a_x, w, acc_x, input_precision=DOT_PRECISION)
            a_ptrs_x += BLOCK_K * stride_ak
        if GATE_UP_SILU and not GATE_UP_BOX:
            # the same input tile against the up rows (up_offset * stride_wn < one expert: int32 is safe)
            if WEIGHT_TMA:
                w_up = w_desc.load([w_row + up_offset, k0]).T
            else:
                w_up = tl.load(w_ptrs + up_offset * stride_wn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if SWAP:
                acc_up = tl.dot(tl.trans(w_up), tl.trans(a), acc_up, input_precision=DOT_PRECISION)
            else:
                acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
            if EXTRA_M > 0:
                acc_x_up = tl.dot(a_x, w_up, acc_x_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if SWAP:
        acc = tl.trans(acc)
        if GATE_UP_SILU and not GATE_UP_BOX:
            acc_up = tl.trans(acc_up)
    if GATE_UP_BOX:
        acc, acc_up = _split_gate_up(acc, TILE_M, BLOCK_N)
    _store_tile(acc, acc_up, offs_m, mask_m, slots, offs_n, mask_n, out_ptr, topk_weights_ptr, stride_om, stride_on,
                pid_k, TOP_K, GATE_UP_SILU, SCATTER_WEIGHTED)
    if EXTRA_M > 0:
        if GATE_UP_BOX:
            acc_x, acc_x_up = _split_gate_up(acc_x, EXTRA_M, BLOCK_N)
        _store_tile(acc_x, acc_x_up, offs_x, mask_x, slots_x, offs_n, mask_n, out_ptr, topk_weights_ptr, stride_om,
                    stride_on, pid_k, TOP_K, GATE_UP_SILU, SCATTER_WEIGHTED)


# The same kernel with its device-side check of expert ids compiled in (debug=True; the launch options
# leave out the overflow checks), for slot schedules: the only ones whose ids no schedule kernel checked.
_expert_gemm_kernel_checked = triton.jit(debug=True, do_not_specialize=["max_blocks"])(_expert_gemm_kernel.fn)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    await_previous(USE_GDC)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


def _tma_ok(t: torch.Tensor) -> bool:
    """Whether the copy engine can serve ``t`` seen as 2-D (rows, K): a Hopper or newer GPU (or the
    interpreter), contiguous, 16-byte aligned rows and base, fewer than 2**31 rows."""
    K = t.shape[-1]
    rows = t.numel() // K if K else 0
    if not (rows and t.is_contiguous() and (K * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
            and rows < 2**31):
        return False
    return t.device.type != "cuda" or torch.cuda.get_device_capability(t.device)[0] >= 9


def _descriptor(t: torch.Tensor, block_shape) -> TensorDescriptor | None:
    """A TMA descriptor over ``t`` seen as 2-D (rows, K), or None where the copy engine cannot serve
    it (``_tma_ok``): those use pointer loads."""
    if not _tma_ok(t):
        return None
    K = t.shape[-1]
    return TensorDescriptor(t, [t.numel() // K, K], [K, 1], list(block_shape))


def _gate_up_descriptor(w13: torch.Tensor, block_n: int, block_k: int) -> TensorDescriptor | None:
    """A TMA descriptor over w13 (E, 2F, K) seen as (2E, F, K), boxes of (2, block_n, block_k): the gate
    rows and the up rows of the same block_n columns in one tile; None where the copy engine cannot serve
    w13 (``_tma_ok``)."""
    if not _tma_ok(w13):
        return None
    E, two_f, K = w13.shape
    F = two_f // 2
    return TensorDescriptor(w13, [2 * E, F, K], [F * K, K, 1], [2, block_n, block_k])


@functools.lru_cache(maxsize=None)
def _l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0


def _group_blocks(tiles, a: torch.Tensor, block_m: int, K: int) -> int:
    """M-blocks per group. Expert groups take up to as many blocks as half of L2 holds input rows
    for (at least ``group_m``): a skewed expert's blocks then all stream its weights at once,
    where a group of a few blocks sweeping N left the next group to read them from HBM again."""
    if not tiles.expert_groups:
        return tiles.group_m
    return max(tiles.group_m, _l2_bytes(a.device) // 2 // (block_m * K * a.element_size()))


def _or(t, placeholder):
    return placeholder if t is None else t


def _launch(a, w, out, sched: Schedule, tiles, *, n: int, n_offset: int, up_offset: int, gather_a: bool,
            gate_up_silu: bool, topk_weights, split_k: int = 1):
    check_matmul_dtype("a", a.dtype)
    if sched.max_blocks == 0:
        return out
    weighted = topk_weights is not None
    scatter = 0 if not weighted else (ADD_TOKEN_ROWS.value if tiles.atomic_combine else WRITE_SLOT_ROWS.value)
    K = w.shape[2]
    k_per_split = cdiv(cdiv(K, split_k), tiles.block_k) * tiles.block_k
    num_n_tiles = cdiv(n, tiles.block_n)
    tiles_bound = sched.max_blocks * num_n_tiles
    min_block_m = min(tiles.min_block_m or sched.block_m, sched.block_m)  # 0: full-height tiles only
    if sched.slot_blocks and tiles.walks_blocks:
        raise ValueError(f"tiles: persistent, sweep_n and interleave walk a built schedule's used blocks; a slot "
                         f"schedule has none (persistent={tiles.persistent}, sweep_n={tiles.sweep_n}, "
                         f"interleave={tiles.interleave})")
    if tiles.interleave and not sched.busy_first:
        raise ValueError("tiles: interleave walks a busy-first block list: build the schedule with "
                         "build_schedule(..., *tiles.block_map)")
    if tiles.persistent and sched.absorb_m:
        raise ValueError(f"tiles: persistent=True runs full-height tiles only; this schedule's blocks absorb tails "
                         f"(built with absorb_m={sched.absorb_m})")
    if tiles.persistent and min_block_m < sched.block_m:
        raise ValueError(f"tiles: persistent=True runs full-height tiles only: min_block_m must be 0 or block_m "
                         f"(got {tiles.min_block_m} < {sched.block_m}; fused_experts sets it for "
                         f"schedule='tail_tiles')")
    grid = (min(tiles_bound, num_sms(a.device)) if tiles.persistent else tiles_bound, split_k)
    w_desc = a_desc = None
    gate_up_box = False
    if tiles.tma:
        if gate_up_silu and tiles.gate_up_one_dot:
            w_desc = _gate_up_descriptor(w, tiles.block_n, tiles.block_k)
            gate_up_box = w_desc is not None
        if w_desc is None:
            w_desc = _descriptor(w, (tiles.block_n, tiles.block_k))
        # contiguous input rows (permuted or the down projection's) through TMA too, whichever weight tile
        if not gather_a and not sched.slot_blocks:  # a slot schedule's one-row tiles load through pointers
            a_desc = _descriptor(a, (sched.block_m, tiles.block_k))
    unused = sched.block_expert  # a pointer for the slot schedule's absent tensors (never read)
    launch(_expert_gemm_kernel_checked if sched.slot_blocks else _expert_gemm_kernel, grid, (
        a, w, out, _or(sched.sorted_slots, unused), topk_weights if weighted else out, sched.block_expert,
        _or(sched.block_row_start, unused), _or(sched.block_rank, unused), _or(sched.block_siblings, unused),
        _or(sched.expert_offsets, unused), _or(sched.num_blocks, unused), _or(sched.num_busy_blocks, unused),
        w_desc, a_desc,
        n, K, sched.top_k, n_offset, up_offset, sched.max_blocks, k_per_split, sched.num_experts,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        gather_a, gate_up_silu, scatter,  # GATHER_A, GATE_UP_SILU, SCATTER_WEIGHTED
        sched.block_m, tiles.block_n, tiles.block_k, _group_blocks(tiles, a, sched.block_m, K), tiles.expert_groups,
        min_block_m, sched.absorb_m,
        K % tiles.block_k == 0, dot_precision(a.dtype), w_desc is not None, a_desc is not None, tiles.persistent,
        tiles.sweep_n if 0 < tiles.sweep_n < num_n_tiles else 0, sched.slot_blocks, gate_up_box, tiles.swap_ab,
        tiles.interleave,
    ), num_warps=tiles.num_warps, num_stages=tiles.num_stages, dependent=not tiles.persistent)
    return out


def gate_up_silu(hidden_states: torch.Tensor, w13: torch.Tensor, sched: Schedule, tiles) -> torch.Tensor:
    """Fused first GEMM: (T, H) tokens, (E, 2F, H) w13 -> (T*k, F) ``silu(gate) * up`` in sorted order.

    Input rows are gathered through the schedule (with ``tiles.permute_input``, copied into
    expert order first, so that TMA can load them). Rows of the result past the valid slots
    (out-of-range ids) are left unwritten.
    """
    if tiles.split_k != 1:
        raise ValueError(f"tiles: the fused gate+up GEMM has no split-K (its SiLU needs whole sums), got "
                         f"split_k={tiles.split_k}")
    if tiles.atomic_combine:
        raise ValueError("tiles: atomic_combine is the down projection's (it adds weighted rows into token rows); "
                         "the gate+up's tiles must not set it")
    S, F = sched.num_tokens * sched.top_k, w13.shape[1] // 2
    out = torch.empty(S, F, dtype=hidden_states.dtype, device=hidden_states.device)
    a = permute(hidden_states, sched) if tiles.permute_input else hidden_states
    return _launch(a, w13, out, sched, tiles, n=F, n_offset=0, up_offset=F, gather_a=not tiles.permute_input,
                   gate_up_silu=True, topk_weights=None)


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, sched: Schedule, tiles, *, n_offset: int = 0,
                 n: int | None = None, gather_a: bool = False,
                 topk_weights: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One projection per M-block: ``a[rows] @ w[e, n_offset:n_offset+n, :]^T``.

    ``a`` is (T, K) in token order with ``gather_a`` (rows picked through the schedule),
    else (T*k, K) in sorted order. With ``topk_weights`` (contiguous floating (T, k), used in
    float32) each output row is multiplied by its routing weight and written at its slot (token
    order, (T*k, n), ready for ``combine``); otherwise rows stay in sorted order.

    ``tiles.split_k`` > 1 (weighted only) splits the reduction over K into that many programs
    per output tile, for calls with too few tiles to fill the GPU (decode). Their float32
    partials land side by side, rows ``slot * split_k + s`` of a (T*k*split_k, n) result, and
    ``combine(result, k * split_k)`` adds them up in a fixed order.

    ``tiles.atomic_combine`` (weighted only): each weighted row (and split-K partial) is added into its
    token's row of a (T, n) result of ``a``'s dtype with atomic adds instead: the layer's output, no
    ``combine``; ``out``, if given, is that result (zeroed here), else one is allocated.
    """
    S = sched.num_tokens * sched.top_k
    n = w.shape[1] - n_offset if n is None else n
    split_k = tiles.split_k
    if split_k != 1 and topk_weights is None:
        raise ValueError(f"tiles: split_k={split_k} needs topk_weights (partials are summed by combine)")
    if tiles.atomic_combine:
        if topk_weights is None:
            raise ValueError("tiles: atomic_combine adds weighted rows into token rows: it needs topk_weights")
        shape = (sched.num_tokens, n)
        if out is None:
            out = torch.zeros(shape, dtype=a.dtype, device=a.device)
        elif tuple(out.shape) != shape or out.dtype != a.dtype or out.device != a.device:
            raise ValueError(f"out must be a {shape} {a.dtype} tensor on {a.device} (tokens x n), got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        else:
            out.zero_()
    elif out is not None:
        raise ValueError("out is the atomic_combine result; without it grouped_gemm allocates its own")
    else:
        dtype = torch.float32 if split_k > 1 else a.dtype
        out = torch.empty(S * split_k, n, dtype=dtype, device=a.device)
    return _launch(a, w, out, sched, tiles, n=n, n_offset=n_offset, up_offset=0, gather_a=gather_a,
                   gate_up_silu=False, topk_weights=topk_weights, split_k=split_k)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Unfused activation: ``silu(gate) * up`` elementwise, computed in fp32."""
    out = torch.empty_like(gate)
    numel = gate.numel()
    if numel:
        block = 1024
        launch(_silu_mul_kernel, (cdiv(numel, block),), (gate, up, out, numel, block))
    return out
