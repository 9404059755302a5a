"""Build the GEMM kernel for Hopper (sm_90) without a GPU and report what the compiler made of it:
shared memory, registers per thread and spills (ptxas -v), and the instructions that matter
(wgmma, bulk tensor copies, cp.async, local memory).

    python -m experiments.sm90_build     # -> results/sm90-build/sm90_build.jsonl

Runs on any machine with Triton's NVIDIA back end (no GPU needed). The kernels are specialised
as on the GPU for the real shapes: bf16, every size argument divisible by 16.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

os.environ["TRITON_INTERPRET"] = "false"  # compile, do not interpret (tritonmoe accepts the import order)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tritonmoe.gemm import _expert_gemm_kernel  # noqa: E402
from . import common  # noqa: E402

# (kernel, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the large-T tiles of the H100 table
CASES = [("gate_up", 128, 128, 64, 8, 4), ("gate_up", 128, 64, 64, 8, 4), ("down", 128, 256, 64, 8, 4),
         ("gate_up", 16, 64, 128, 4, 4)]
# tiles under 64 rows as the transposed product (TileConfig.swap_ab): 16-row blocks, and 128-row blocks with
# tail tiles down to 16 rows (the kernel then holds a branch per tile height)
SWAP_CASES = [("gate_up", 16, 64, 128, 4, 4, 16), ("down", 16, 64, 128, 4, 4, 16), ("gate_up", 128, 128, 64, 8, 4, 16),
              ("down", 128, 256, 64, 8, 4, 16)]
INSTRUCTIONS = {"wgmma": r"wgmma\.mma_async", "bulk_tensor_copy": r"cp\.async\.bulk\.tensor",
                "cp_async": r"cp\.async\.(?:ca|cg)", "local_memory": r"(?:ld|st)\.local",
                "setmaxnreg": r"setmaxnreg", "griddepcontrol": r"griddepcontrol\.(?:wait|launch_dependents)"}
DIVISIBLE = ("N", "K", "stride_am", "stride_om", "stride_wn", "k_per_split", "n_offset", "up_offset", "stride_we")


def build(kernel: str, bm: int, bn: int, bk: int, warps: int, stages: int, tma: bool, persistent: bool = False,
          permute_input: bool = False, min_bm: int | None = None, swap_ab: bool = False,
          interleave: bool = False) -> dict:
    gate_up = kernel == "gate_up"
    gather = gate_up and not permute_input
    a_tma = tma and not gather  # gathered inputs stay pointer loads
    names = _expert_gemm_kernel.arg_names
    consts = dict(GATHER_A=gather, GATE_UP_SILU=gate_up, SCATTER_WEIGHTED=not gate_up, BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_K=bk, GROUP_M=8, EXPERT_GROUPS=True, MIN_BLOCK_M=min_bm or bm, ABSORB_M=0, EVEN_K=True,
                  DOT_PRECISION="tf32", WEIGHT_TMA=tma, A_TMA=a_tma, PERSISTENT=persistent, SWEEP_N=0, SLOT_BLOCKS=False,
                  GATE_UP_BOX=gate_up and tma, SWAP_AB=swap_ab, INTERLEAVE=interleave, USE_GDC=True, stride_ak=1, stride_wk=1, stride_on=1)
    if not tma:
        consts["w_desc"] = None
    if not a_tma:
        consts["a_desc"] = None
    types = dict(w_desc=f"tensordesc<bf16[2, {bn}, {bk}]>" if gate_up and tma else f"tensordesc<bf16[{bn}, {bk}]>", a_desc=f"tensordesc<bf16[{bm}, {bk}]>",
                 sorted_slots_ptr="*i32", topk_weights_ptr="*fp32", block_expert_ptr="*i32", block_row_ptr="*i32",
                 block_rank_ptr="*i32", block_siblings_ptr="*i32", expert_offsets_ptr="*i32", num_blocks_ptr="*i32",
                 num_busy_ptr="*i32",
                 stride_we="i64")
    sig = {n: "constexpr" if n in consts else types.get(n, "*bf16" if n.endswith("_ptr") else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr") or n in DIVISIBLE}
    src = ASTSource(_expert_gemm_kernel, sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages,
                                                                                   launch_pdl=True))
    ptx = compiled.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                text=True).stderr
    regs, spills = re.search(r"Used (\d+) registers", report), re.search(r"(\d+) bytes spill stores", report)
    return {"kernel": kernel, "block_m": bm, "block_n": bn, "block_k": bk, "num_warps": warps, "num_stages": stages,
            "tma": tma, "min_block_m": min_bm or bm, "swap_ab": swap_ab, "interleave": interleave,
            "persistent": persistent, "shared_bytes": compiled.metadata.shared,
            "registers": int(regs.group(1)) if regs else None, "spill_store_bytes": int(spills.group(1)) if spills else None,
            **{f"ptx_{k}": len(re.findall(v, ptx)) for k, v in INSTRUCTIONS.items()}}


def main() -> None:
    prov = {**common.provenance(torch.device("cpu"), 0), "device": "sm90-build", "target": "cuda sm_90 (ptxas sm_90a)"}
    rows = []
    builds = [(case, dict()) for case in CASES]
    builds += [(case[:6], dict(min_bm=case[6], swap_ab=swap)) for case in SWAP_CASES for swap in (False, True)
               if swap or case[6] < case[1]]  # 16-row blocks unswapped are CASES' last
    # the interleaved walk (TileConfig.interleave) in the skew shapes' kept tiles: the 128-row gate+up per tile and
    # persistent, and the down projection
    builds += [(CASES[0], dict(interleave=True)), (CASES[0], dict(interleave=True, persistent=True)),
               (CASES[2], dict(interleave=True))]
    for case, extra in builds:
        for tma in (False, True):
            rows.append({**prov, "experiment": "sm90_build", **build(*case, tma, **extra)})
            r = rows[-1]
            print(f"{r['kernel']:8s} {r['block_m']:>3d}x{r['block_n']:<3d}x{r['block_k']:<3d} w{r['num_warps']} "
                  f"s{r['num_stages']} tail{r['min_block_m']:<3d} swap={str(r['swap_ab']):5s} tma={str(tma):5s} "
                  f"pers={str(r['persistent']):5s} il={str(r['interleave']):5s} regs {r['registers']:>3} spills {r['spill_store_bytes']} "
                  f"smem {r['shared_bytes'] // 1024:>3d} KB  wgmma {r['ptx_wgmma']} bulk {r['ptx_bulk_tensor_copy']} "
                  f"cp.async {r['ptx_cp_async']} local {r['ptx_local_memory']}", flush=True)
    path = common.REPO / "results" / "sm90-build" / "sm90_build.jsonl"
    common.write_rows(path, rows, ("experiment", "kernel", "block_m", "block_n", "block_k", "num_warps",
                                   "num_stages", "tma", "min_block_m", "swap_ab", "persistent", "interleave"))
    print(f"{len(rows)} rows -> {path.relative_to(common.REPO)}")


if __name__ == "__main__":
    main()
