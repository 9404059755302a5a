"""Dispatch one Hydra job: build the shapes, measure the ceilings, run the experiment, write rows."""
from __future__ import annotations

import json
import time

import torch
from omegaconf import DictConfig, OmegaConf

from . import common, hf_model, latency, skew, stages, traffic, tune

EXPERIMENTS = {"latency": latency, "tune": tune, "skew": skew, "stages": stages, "traffic": traffic,
               "hf_model": hf_model}


def run(cfg: DictConfig) -> None:
    device = torch.device(cfg.profile.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile=gpu needs a CUDA device; on a CPU-only machine use profile=smoke")
    module = EXPERIMENTS[cfg.experiment.name]
    dtype = getattr(torch, cfg.profile.get("dtype") or cfg.experiment.dtype)
    spec = common.model_spec(cfg.model.name, cfg.profile.shrink)
    torch.manual_seed(cfg.seed)
    common.L2_FLUSH = cfg.profile.get("l2_flush", common.L2_FLUSH)
    if common.L2_FLUSH not in common.L2_FLUSH_KINDS:
        raise SystemExit(f"profile.l2_flush must be one of {common.L2_FLUSH_KINDS}, got {common.L2_FLUSH!r}")
    prov = common.provenance(device, cfg.seed)
    start = time.time()
    print(f"measuring ceilings on {prov['device']} ...", flush=True)
    ceilings = common.measure_ceilings(device, cfg.profile.warmup_ms, cfg.profile.rep_ms)
    if device.type != "cuda":  # the interpreter has no meaningful ceilings: nominal ones keep the columns filled
        ceilings = {"hbm_read_Bps": 1e9, "bf16_flops": 1e9}
    progress = common.Progress(module.num_steps(cfg), cfg.experiment.name)
    rows = module.run(cfg, spec, device, dtype, cfg.seed, prov, ceilings, progress)
    out_dir = common.results_dir(cfg, device)
    path = out_dir / f"{cfg.experiment.name}.jsonl"
    common.write_rows(path, rows, module.KEY)
    # one record per run (rows are replaced by later runs; the record of each run stays)
    with open(out_dir / "runs.jsonl", "a") as runs:
        runs.write(json.dumps({"experiment": cfg.experiment.name, "model": spec.name, **prov, **ceilings,
                               "config": OmegaConf.to_container(cfg, resolve=True)}, sort_keys=True) + "\n")
    print()
    print(module.summary(rows))
    shown = path.relative_to(common.REPO) if path.is_relative_to(common.REPO) else path
    print(f"\n{len(rows)} rows -> {shown} ({time.time() - start:.0f} s)")
