"""The experiments compose and run end to end at tiny shapes (the smoke profile, CPU interpreter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
MODELS = ["mixtral_8x7b", "qwen2_57b_a14b", "deepseek_v3"]


def smoke_env() -> dict:
    """The environment of a ``python -m experiments`` child: the repository importable, the caller's path kept
    (where its packages may live), the interpreter on."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "TRITON_INTERPRET": "1"}


def run_smoke(tmp_path, experiment: str, *overrides: str) -> list[dict]:
    """Rows of ``python -m experiments experiment=<experiment> profile=smoke`` run into tmp_path (the
    smoke profile runs the interpreter, also on a machine with a GPU)."""
    env = smoke_env()
    cmd = [sys.executable, "-m", "experiments", f"experiment={experiment}", "profile=smoke",
           f"results_root={tmp_path}", *overrides, f"hydra.run.dir={tmp_path}/hydra"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / "smoke" / f"{experiment}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("profile", ["gpu", "smoke"])
@pytest.mark.parametrize("model", MODELS)
def test_configs_compose(model, profile):
    with initialize_config_dir(config_dir=str(REPO / "experiments" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", f"profile={profile}"])
    assert cfg.model.name == model and cfg.experiment.name == "latency"


@pytest.mark.interpreter_only
def test_smoke_latency_runs(tmp_path):
    # the smoke profile runs the interpreter, also on a machine with a GPU
    env = smoke_env()
    cmd = [sys.executable, "-m", "experiments", "profile=smoke", "model=mixtral_8x7b", f"results_root={tmp_path}",
           "profile.tokens=[3]", f"hydra.run.dir={tmp_path}/hydra"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "smoke" / "latency.jsonl").read_text().splitlines()]
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["tritonmoe_fused"]["status"] == "ok" and by_impl["tritonmoe_fused"]["rel_err"] < 1e-5
    assert by_impl["tritonmoe_unfused"]["status"] == "ok" and by_impl["torch_loop"]["status"] == "ok"
    assert by_impl["megablocks"]["status"] == "unavailable"
    for field in ("device", "torch", "triton", "commit", "date", "seed", "ms_p50", "floor_ms"):
        assert field in by_impl["tritonmoe_fused"], field
    # re-running replaces rows instead of appending duplicates
    assert subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600).returncode == 0
    assert len((tmp_path / "smoke" / "latency.jsonl").read_text().splitlines()) == len(rows)


@pytest.mark.interpreter_only
def test_smoke_latency_tile_variants(tmp_path):
    # the A/Bs of the atomic combine and of swapped small tiles: their forwards checked against the reference
    rows = run_smoke(tmp_path, "latency", "model=qwen2_57b_a14b", "profile.tokens=[5]",
                     "experiment.impls=[tritonmoe_fused,tritonmoe_atomic_combine,tritonmoe_swap_ab]")
    assert {r["impl"] for r in rows} == {"tritonmoe_fused", "tritonmoe_atomic_combine", "tritonmoe_swap_ab"}
    assert all(r["status"] == "ok" and r["rel_err"] < 1e-5 for r in rows)


def test_import_order_error():
    # Without a GPU, importing triton before tritonmoe (and no TRITON_INTERPRET) must fail clearly.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", "import triton, tritonmoe"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "import tritonmoe before triton" in proc.stderr


@pytest.mark.interpreter_only
def test_smoke_skew_runs(tmp_path):
    rows = run_smoke(tmp_path, "skew", "profile.tokens=[3]", "experiment.experts=[8]", "experiment.skews=[0,hot]")
    fused = {r["skew"]: r for r in rows if r["impl"] == "tritonmoe_fused"}
    assert set(fused) == {"0", "hot"} and all(r["status"] == "ok" and r["rel_err"] < 1e-5 for r in fused.values())
    assert fused["hot"]["max_count"] == 3 and fused["0"]["max_count"] < 3   # T=3, k=2, E=8: hot takes every token
    # every checked forward of the cell is timed in the cell's turns (one round under the smoke profile)
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["timing"] == "round_robin" and r["rounds"] == 1 and r["ms_p50"] > 0 for r in ok)


@pytest.mark.interpreter_only
def test_smoke_stages_runs(tmp_path):
    rows = run_smoke(tmp_path, "stages", "profile.tokens=[3]", "experiment.launch_impls=[tritonmoe_fused]")
    timed = [r for r in rows if r["stage"] != "launches per forward"]
    assert len(timed) == 10 and all(r["ms_p50"] > 0 and r["bytes"] > 0 for r in timed)
    fused_gemm = next(r for r in timed if r["stage"].startswith("gate+up"))
    assert fused_gemm["flops"] == 2 * 3 * 2 * 2 * 64 * 32   # 2 S (2F) H with T=3, k=2, F=32, H=64 (smoke)


@pytest.mark.interpreter_only
def test_smoke_traffic_runs(tmp_path):
    rows = run_smoke(tmp_path, "traffic", "profile.tokens=[3]")
    analytic = {(r["pipeline"], r["item"]): r for r in rows if r["source"] == "analytic"}
    # T=3, k=2, F=32, bf16 -> fp32 in smoke (4 bytes): gate_out is written once and read once
    assert analytic[("unfused", "gate_out")]["write_bytes"] == 3 * 2 * 32 * 4
    assert ("fused", "gate_out") not in analytic
    measured = [r for r in rows if r["source"] == "measured"]
    assert {r["status"] for r in measured} == {"skipped"}   # no ncu on the CPU: said, not faked


def test_ncu_csv_parsing(monkeypatch):
    from experiments import traffic
    csv_out = ('==PROF== Connected\n"ID","Process ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
               '"0","1","_permute_kernel(int)","dram__bytes_read.sum","byte","1,000"\n'
               '"0","1","_permute_kernel(int)","dram__bytes_write.sum","byte","500"\n'
               '"1","1","_expert_gemm_kernel","dram__bytes_read.sum","byte","2000"\n'
               '"1","1","_expert_gemm_kernel","dram__bytes_write.sum","byte","30"\n')
    monkeypatch.setattr(traffic.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=csv_out, stderr=""))
    kernels = traffic.measure_with_ncu("ncu", "mixtral_8x7b", 4, "unfused", "bfloat16", 0)
    assert kernels == [{"kernel": "_permute_kernel", "dram_read_bytes": 1000.0, "dram_write_bytes": 500.0},
                       {"kernel": "_expert_gemm_kernel", "dram_read_bytes": 2000.0, "dram_write_bytes": 30.0}]


@pytest.mark.interpreter_only
def test_smoke_hf_model_runs(tmp_path):
    pytest.importorskip("transformers", minversion="5", reason="needs transformers>=5 (pip install 'tritonmoe[hf]')")
    rows = run_smoke(tmp_path, "hf_model")
    graph_rows = [r for r in rows if r["phase"].endswith("_graph")]
    assert {(r["phase"], r["impl"]) for r in graph_rows} == {(p, i) for p in ("prefill_graph", "decode_graph")
                                                            for i in ("tritonmoe", "tritonmoe+router", "grouped_mm")}
    assert all(r["status"] == "unavailable" and "CUDA" in r["reason"] for r in graph_rows)   # said, not faked
    cells = {(r["phase"], r["tokens"]) for r in rows if r not in graph_rows}
    assert cells == {("prefill", 8), ("decode", 1), ("decode", 2)}   # the smoke block of hf_model.yaml
    for phase, tokens in cells:
        by_impl = {r["impl"]: r for r in rows if (r["phase"], r["tokens"]) == (phase, tokens)}
        assert set(by_impl) == {"eager", "grouped_mm", "tritonmoe", "tritonmoe+router"}
        for impl in ("eager", "tritonmoe", "tritonmoe+router"):
            r = by_impl[impl]
            assert r["status"] == "ok" and r["ms_p50"] > 0 and r["tokens_per_s"] > 0, r
            assert r["experts_rel_err"] < 1e-5 and r["rel_err"] < 1e-5, r   # float32: no routing flips expected
        gmm = by_impl["grouped_mm"]   # torch's CPU grouped_mm may or may not serve it: either is a result
        assert (gmm["status"] == "ok" and gmm["experts_rel_err"] < 1e-5
                or gmm["status"] == "unavailable" and gmm["reason"]), gmm
        assert by_impl["tritonmoe"]["dtype"] == "float32" and by_impl["tritonmoe"]["layers"] == 2
        assert by_impl["tritonmoe"]["context"] == (8 if phase == "decode" else 0)
        for field in ("device", "torch", "triton", "commit", "date", "seed", "ms_p20", "ms_p80"):
            assert field in by_impl["tritonmoe"], field


def test_round_robin_timer_takes_turns():
    # one untimed call each, then every round times each callable once, in a fresh order per round
    import torch
    from experiments import common
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times = common.time_round_robin(fns, torch.device("cpu"), rounds=6, seed=1)
    assert set(times) == set("abcd") and all(len(t) == 6 and min(t) >= 0 for t in times.values())
    assert sorted(calls[:4]) == list("abcd") and len(calls) == 4 * 7
    rounds = [calls[i:i + 4] for i in range(4, len(calls), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds) and len({tuple(r) for r in rounds}) > 1
    with pytest.raises(ValueError, match="rounds"):
        common.time_round_robin(fns, torch.device("cpu"), rounds=0)


@pytest.mark.interpreter_only
def test_l2_flush_is_recorded_and_checked(tmp_path, monkeypatch):
    # the profile's l2_flush (default: read) reaches every row's provenance; an unknown kind is refused,
    # naming the option
    rows = run_smoke(tmp_path, "latency", "profile.tokens=[3]", "experiment.impls=[tritonmoe_fused]")
    assert rows and all(r["l2_flush"] == "read" for r in rows)
    import torch
    from experiments import common
    monkeypatch.setattr(common, "L2_FLUSH", "memset")
    with pytest.raises(ValueError, match="l2_flush"):
        common.time_ms(lambda: None, torch.device("cpu"), 0, 0)
    proc = subprocess.run([sys.executable, "-m", "experiments", "experiment=latency", "profile=smoke",
                           f"results_root={tmp_path}", "++profile.l2_flush=memset", f"hydra.run.dir={tmp_path}/h2"],
                          cwd=REPO, env=smoke_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "profile.l2_flush" in proc.stderr + proc.stdout


@pytest.mark.interpreter_only
def test_smoke_tune_skew_shapes(tmp_path):
    # the tuner on the skew experiment's shapes (one small space, CPU: rows only, no table written)
    space = ["experiment.space.block_n=[32]", "experiment.space.block_k=[32]", "experiment.space.num_warps=[4]",
             "experiment.space.tma=[false]", "experiment.space.num_stages=[2]", "experiment.space.group_m=[4]",
             "experiment.space.split_k=[2]", "experiment.space.min_block_m=[16]", "experiment.space.permute_input=false",
             "experiment.space.absorb_m=[]"]
    rows = run_smoke(tmp_path, "tune", "profile.tokens=[3]", "experiment.skew_experts=[8,16]", *space)
    assert {r["model"] for r in rows} == {"mixtral_8x7b_E8", "mixtral_8x7b_E16"}
    assert all(r["status"] == "ok" for r in rows)
    assert not (tmp_path / "configs").exists()
    # the chosen tiles' forward against the interpreter's defaults, one kept per shape
    checks = [r for r in rows if r["stage"] == "forward_check"]
    assert sorted((r["model"], r["candidate"]) for r in checks) == [
        ("mixtral_8x7b_E16", "before"), ("mixtral_8x7b_E16", "tuned"), ("mixtral_8x7b_E8", "before"),
        ("mixtral_8x7b_E8", "tuned")]
    assert all(sum(r["kept"] for r in checks if r["model"] == m) == 1 for m in ("mixtral_8x7b_E8", "mixtral_8x7b_E16"))


@pytest.mark.interpreter_only
def test_smoke_tune_robust_stage(tmp_path):
    # the robust stage times its finalists on the model's routing and each skew routing, tails, sweeps and
    # absorbed tails too
    space = ["experiment.space.block_n=[32]", "experiment.space.block_k=[32]", "experiment.space.num_warps=[4]",
             "experiment.space.tma=[false]", "experiment.space.num_stages=[2]", "experiment.space.group_m=[4]",
             "experiment.space.split_k=[2]", "experiment.space.min_block_m=[]", "experiment.space.permute_input=false",
             "experiment.space.absorb_m=[]", "experiment.space.robust_min_block_m=[16]",
             "experiment.space.robust_sweep_n=[1]", "experiment.space.robust_absorb_m=[16]"]
    rows = run_smoke(tmp_path, "tune", "profile.tokens=[3,40]", "experiment.skew_experts=[8]",
                     "experiment.robust_skews=[0,hot]", "experiment.robust_finalists=1",
                     "experiment.robust_min_tokens=40", *space)
    robust = [r for r in rows if r["stage"] == "robust"]
    assert all(r["status"] == "ok" for r in rows)
    assert {r["routing"] for r in robust} == {"model", "0", "hot"}
    assert {r["T"] for r in robust} == {40} and {r["T"] for r in rows} == {3, 40}  # robust_min_tokens
    assert {r["T"] for r in rows if r["stage"] == "forward_check"} == {3}  # not where the robust stage chose
    for kernel in ("gate_up", "down"):
        configs = {r["config"] for r in robust if r["kernel"] == kernel}
        assert any("tail16" in c for c in configs) and any("sw1" in c for c in configs), configs
        assert any("abs16" in c for c in configs) or all(c.startswith("m16") for c in configs), configs
        for c in configs:  # every finalist on every routing
            assert {r["routing"] for r in robust if (r["kernel"], r["config"]) == (kernel, c)} == {"model", "0", "hot"}


def test_robust_pair_minimises_the_slowest_routing():
    from tritonmoe import TileConfig
    from experiments.tune import slowest_routing_pair

    def timed(**by_routing):
        return {r: {"ms_p50": v} for r, v in by_routing.items()}

    fast, robust = TileConfig(block_m=64, block_n=128), TileConfig(block_m=64, block_n=64, min_block_m=16)
    other_m = TileConfig(block_m=128, block_n=128)
    ms = {("gate_up", fast): timed(model=1.0, hot=3.0),      # fastest on the model's routing, slow under skew
          ("gate_up", robust): timed(model=1.2, hot=1.5),
          ("down", fast): timed(model=0.5, hot=0.6),
          ("down", other_m): timed(model=0.1, hot=0.1),      # pays a block map of its own
          ("down", robust): timed(model=0.6)}                # not timed on every routing: never chosen
    worst, slowest, (up, _), (down, _) = slowest_routing_pair(ms, ["model", "hot"], lambda r, bm: 0.55)
    assert (up, down, slowest) == (robust, fast, "hot") and worst == pytest.approx(2.1)
    worst, _, _, (down, _) = slowest_routing_pair(ms, ["model", "hot"], lambda r, bm: 0.2)
    assert down == other_m and worst == pytest.approx(1.8)
    assert slowest_routing_pair({("gate_up", fast): timed(model=1.0)}, ["model"], lambda r, bm: 0) is None


def test_tune_skew_top_k_matches_the_skew_experiment():
    with initialize_config_dir(config_dir=str(REPO / "experiments" / "conf"), version_base="1.3"):
        tune = compose("config", overrides=["experiment=tune"]).experiment
        skew = compose("config", overrides=["experiment=skew"]).experiment
    assert dict(tune.skew_top_k) == dict(skew.top_k)


@pytest.mark.interpreter_only
def test_probe_ridge_smoke():
    # the ridge probe at tiny shapes on the interpreter: every implementation at every point, both GEMMs,
    # each checked output correct, the dense sweep's floors counted from its shapes (nothing written)
    env = smoke_env()
    code = "import json; from experiments import probe_ridge; print(json.dumps(probe_ridge.main(smoke=True)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    points = [r for r in rows if r["kind"] == "point"]
    assert {(r["impl"], r["gemm"]) for r in points} >= {(i, g) for i in ("cublas_bmm@balanced", "tritonmoe",
                                                                            "tritonmoe@balanced")
                                                        for g in ("gate_up", "down")}
    assert all(r["status"] == "ok" for r in points)
    assert all(r["rel_err"] <= 1e-2 for r in points if "rel_err" in r)
    dense = [r for r in rows if r["kind"] == "dense"]
    assert dense and all(r["bytes"] == 2 * (r["M"] * r["K"] + r["N"] * r["K"] + r["M"] * r["N"]) for r in dense)


def test_probe_sweep_group_cap_caps_and_restores():
    # the probe's group variants cap gemm._group_blocks only inside the block, and only for "group<n>"
    import torch
    from experiments import probe_sweep
    from tritonmoe import TileConfig, gemm
    grown, tiles, a = gemm._group_blocks, TileConfig(group_m=8), torch.empty(2, 64)
    with probe_sweep._group_cap("group4"):
        assert gemm._group_blocks(tiles, a, 16, 64) == 4
    assert gemm._group_blocks is grown and grown(tiles, a, 16, 64) == 8
    with probe_sweep._group_cap("tuned"):
        assert gemm._group_blocks is grown


@pytest.mark.interpreter_only
def test_probe_combine_smoke():
    # the fused-combine probe at tiny shapes on the interpreter: every op at every point, each result checked
    # (the atomic buffer holds k everywhere: every token's k rows added), nothing written
    env = smoke_env()
    code = "import json; from experiments import probe_combine; print(json.dumps(probe_combine.main(smoke=True)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {(r["model"], r["op"]) for r in rows} == {(m, op) for m in MODELS for op in
                                                     ("combine", "rows_write", "atomic_add", "zero", "cast")}
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.interpreter_only
def test_probe_routing_counts_and_padding():
    # every (model, T) routes T k slots (the probe asserts it); padded rows are whole tiles per touched expert
    from experiments import probe_routing
    assert probe_routing.padded_rows([0, 1, 64, 65, 130], 64) == 0 + 64 + 64 + 128 + 192
    assert probe_routing.padded_rows([3, 16], 16) == 32
    env = smoke_env()
    code = "import json; from experiments import probe_routing; print(json.dumps(probe_routing.main(smoke=True)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["model"] for r in rows} == set(probe_routing.MODELS)
    for r in rows:
        assert sum(r["expert_counts"]) == r["slots"] == r["T"] * r["top_k"]
        assert r["distinct_experts"] == sum(c > 0 for c in r["expert_counts"]) <= r["num_experts"]
        assert r["slots"] <= r["padded_rows_16"] <= r["padded_rows_64"] <= r["padded_rows_128"]


@pytest.mark.interpreter_only
def test_probe_skew_order_relabels_by_rank():
    # the same routing with experts renamed by popularity rank: a permutation; hot_first / hot_last / spread put
    # the most popular expert at id 0 / E-1 / 0 and the second at 1 / E-2 / E/8+1; every count kept (s = 0.5: no
    # expert capped at T, so no ties at the top)
    import torch
    from experiments import probe_skew_order as pso
    from experiments.skew import expert_counts, skewed_topk_ids
    E, T, k = 64, 256, 8
    ids = skewed_topk_ids(T, k, E, 0.5, seed=0)
    counts = expert_counts(T, k, E, 0.5)
    for order, first, second in (("hot_first", 0, 1), ("hot_last", E - 1, E - 2), ("spread", 0, E // 8 + 1)):
        new = pso.relabel(ids, counts, E, order)
        c = torch.bincount(new.flatten().long(), minlength=E)
        assert sorted(c.tolist()) == sorted(counts) and c.argmax().item() == first
        assert c.argsort(descending=True, stable=True)[1].item() == second, order
        assert all(len(set(row.tolist())) == k for row in new)  # still k distinct experts per token
    assert pso.relabel(ids, counts, E, "as_grid") is ids
    env = smoke_env()
    code = "import json; from experiments import probe_skew_order; print(json.dumps(probe_skew_order.main(smoke=True)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(r["status"] == "ok" for r in rows) and {r["order"] for r in rows} == set(pso.ORDERS)


def test_dense_topk_ids_and_profile_cells():
    # the dense control: every token on experts 0..k-1, k distinct per token; the profile probe's E:T cells
    import pytest
    import torch
    from experiments import probe_skew_profile as psp
    from experiments.skew import dense_topk_ids
    ids = dense_topk_ids(5, 3)
    assert ids.shape == (5, 3) and ids.dtype.is_signed and all(row.tolist() == [0, 1, 2] for row in ids)
    from experiments.skew import parse_probe_cells, probe_skews
    assert parse_probe_cells(["64:2048", "256:8192"], psp.CELLS, "p") == ((64, 2048), (256, 8192))
    # the probes' routings by label are the skew grid's, and their top-k is skew.yaml's
    from omegaconf import OmegaConf
    from experiments.skew import PROBE_TOP_K, probe_topk_ids, skewed_topk_ids
    assert torch.equal(probe_topk_ids("dense", 5, 3, 8, "cpu"), ids)
    for label in ("2.0", "hot"):
        assert torch.equal(probe_topk_ids(label, 64, 4, 16, "cpu", 3),
                           skewed_topk_ids(64, 4, 16, 2.0 if label == "2.0" else "hot", seed=3))
    assert PROBE_TOP_K == OmegaConf.to_container(OmegaConf.load(REPO / "experiments/conf/experiment/skew.yaml").top_k)
    assert parse_probe_cells([], psp.CELLS, "p") == psp.CELLS
    for bad in (["64"], ["64:x"], ["64:2048:1"]):
        with pytest.raises(SystemExit, match="p: cells are E:T"):
            parse_probe_cells(bad, psp.CELLS, "p")
    # PROBE_SKEWS picks the routings; a label that is none names the variable
    mp = pytest.MonkeyPatch()
    try:
        mp.delenv("PROBE_SKEWS", raising=False)
        assert probe_skews(psp.SKEWS, "p") == psp.SKEWS
        mp.setenv("PROBE_SKEWS", "0, 1.0,hot,dense")
        assert probe_skews(psp.SKEWS, "p") == ("0", "1.0", "hot", "dense")
        mp.setenv("PROBE_SKEWS", "0,zipf")
        with pytest.raises(SystemExit, match="PROBE_SKEWS.*'zipf'"):
            probe_skews(psp.SKEWS, "p")
    finally:
        mp.undo()


@pytest.mark.interpreter_only
def test_probe_skew_group_variants():
    # the group override is live inside its block and gone after it; tails_64 makes 128-row tiles per-tile with
    # 64-row tails and leaves 64-row tiles alone; the smoke run checks every variant's output (CPU interpreter)
    import torch
    from experiments import probe_skew_group as psg
    from tritonmoe import TileConfig, gemm
    rule, tiles, a = gemm._group_blocks, TileConfig(block_m=128, group_m=8, persistent=True), torch.empty(1, 1)
    for variant, want in (("group_2", 2), ("group_64", 64), ("group_m", 8), ("group_16", 16)):
        with psg.package_settings(variant):
            assert gemm._group_blocks(tiles, a, 128, 4096) == want
        assert gemm._group_blocks is rule
    # l2_<d>: as many blocks as 1/d of L2 holds input rows for, at least group_m (l2_2 is the package's rule)
    import unittest.mock
    with unittest.mock.patch.object(gemm, "_l2_bytes", lambda device: 50 * 2**20):
        for variant, want in (("l2_2", 25), ("l2_4", 12), ("l2_16", 8)):
            with psg.package_settings(variant):
                assert gemm._group_blocks(tiles, torch.empty(1, 1, dtype=torch.bfloat16), 128, 4096) == want
        assert rule(tiles, torch.empty(1, 1, dtype=torch.bfloat16), 128, 4096) == 25
    # no_pdl: launches without programmatic dependent launch inside the block; restored after it
    from tritonmoe import _launch
    with unittest.mock.patch.object(gemm, "_l2_bytes", lambda device: 50 * 2**20):
        with psg.package_settings("l2_4+no_pdl"):
            assert _launch.PDL is False and gemm._group_blocks(tiles, torch.empty(1, 1, dtype=torch.bfloat16),
                                                                128, 4096) == 12
    assert _launch.PDL is True and gemm._group_blocks is rule
    for good in ("chunk_4096", "l2_4", "group_m", "tails_64", "group_m+chunk_4096", "no_pdl", "l2_4+no_pdl+chunk_64"):
        assert psg.check_variant(good) == good
    for bad in ("group_0", "l2_x", "chunk", "groups_4", "no_pdl+no_pdl", "group_2+l2_4", "tuned+no_pdl", "balanced"):
        with pytest.raises(SystemExit, match="unknown variant"):
            psg.check_variant(bad)
    with psg.package_settings("tuned"):
        assert gemm._group_blocks is rule
    # what fused_experts runs for a variant, and the variants a run takes from PROBE_VARIANTS
    assert psg.variant_forward("consecutive", (tiles, tiles), None) == ((tiles, tiles), "fixed", None)
    assert psg.variant_forward("l2_4+chunk_64", (tiles, tiles), 4096) == ((tiles, tiles), "expert_groups", 64)
    assert psg.variant_forward("tuned", (tiles, tiles), 4096)[2] == 4096
    with unittest.mock.patch.dict(os.environ, {"PROBE_VARIANTS": "tuned, no_pdl"}):
        assert psg.probe_variants(psg.VARIANTS) == ("tuned", "no_pdl")
    with unittest.mock.patch.dict(os.environ, {"PROBE_VARIANTS": "tuned,bogus"}):
        with pytest.raises(SystemExit, match="unknown variant 'bogus'"):
            psg.probe_variants(psg.VARIANTS)
    t = psg.variant_tiles(tiles, "tails_64")
    assert (t.persistent, t.min_block_m, t.block_m) == (False, 64, 128)
    small = TileConfig(block_m=64)
    assert psg.variant_tiles(small, "tails_64") is small and psg.variant_tiles(tiles, "group_2") is tiles
    code = "import json; from experiments import probe_skew_group; print(json.dumps(probe_skew_group.main(smoke=True)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=smoke_env(), capture_output=True, text=True,
                          check=True)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(r["status"] == "ok" for r in rows) and {r["variant"] for r in rows} == set(psg.VARIANTS)


@pytest.mark.interpreter_only
def test_probe_skew_interleave_variants():
    # interleave turns the two-ended walk on (and sweeps off: the walk does not take them); tails_64 makes 128-row
    # tiles per-tile with 64-row tails; the smoke run checks every variant's forward (CPU interpreter)
    from experiments import probe_skew_interleave as psi
    from tritonmoe import TileConfig
    tiles = TileConfig(block_m=128, sweep_n=4)
    assert psi.variant_tiles(tiles, "tuned") is tiles
    t = psi.variant_tiles(tiles, "interleave")
    assert (t.interleave, t.sweep_n, t.min_block_m) == (True, 0, 0) and t.block_map == (128, 0, True)
    t = psi.variant_tiles(TileConfig(block_m=128, persistent=True), "interleave_tails_64")
    assert (t.interleave, t.persistent, t.min_block_m) == (True, False, 64)
    t = psi.variant_tiles(TileConfig(block_m=128, persistent=True), "interleave_per_tile")
    assert (t.interleave, t.persistent, t.min_block_m) == (True, False, 0)
    t = psi.variant_tiles(TileConfig(block_m=128, persistent=True), "interleave_swap_16")
    assert (t.interleave, t.persistent, t.min_block_m, t.swap_ab) == (True, False, 16, True)
    code = ("import json; from experiments import probe_skew_interleave as p; "
            "print(json.dumps(p.main(smoke=True)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=smoke_env(), capture_output=True, text=True,
                          check=True)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(r["status"] == "ok" for r in rows) and {r["variant"] for r in rows} == set(psi.VARIANTS)
    assert {r["skew"] for r in rows} == set(psi.SKEWS)


@pytest.mark.interpreter_only
def test_probe_ws_smoke():
    from experiments import probe_ws
    # the warp-specialisation probe at tiny shapes on the interpreter: every kernel variant runs in its
    # child process and matches cuBLAS's (here torch's) product before it is timed
    code = "import json; from experiments import probe_ws; print(json.dumps(probe_ws.main(smoke=True)))"
    out = subprocess.run([sys.executable, "-c", code], env=smoke_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in rows} == {"cublas", "tile", "persistent", "persistent_ws", *probe_ws.GATE_UP_KERNELS}
    assert all(r["status"] == "ok" and r["rel_err"] <= 1e-2 for r in rows), rows


def test_refine_offers_persistent_one_dot_gate_up():
    # the gate+up's best tiles of 64+ rows also as persistent one-dot programs (full-height tiles, one sweep), and at
    # 128 rows the dense probe's structure; never for the down projection or small blocks, and the robust stage
    # varies none of them
    from dataclasses import replace
    from omegaconf import OmegaConf
    from experiments.tune import refine, robust_variants
    from tritonmoe import TileConfig
    space = OmegaConf.create(dict(num_stages=[3], group_m=[8], split_k=[2], min_block_m=[16], absorb_m=[32],
                                  persistent=True, robust_min_block_m=[16], robust_sweep_n=[4], robust_absorb_m=[32]))
    best = TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4, tma=True)
    got = [t for t in refine("gate_up", best, space, False) if t.persistent]
    assert got == [replace(best, persistent=True), replace(best, persistent=True, num_stages=3)]
    assert not any(t.persistent for t in refine("down", best, space, False))
    # pointer tiles are tried persistent with TMA weight tiles (the one-dot box), tails dropped
    pointer = replace(best, tma=False, block_n=64, min_block_m=16)
    assert [t for t in refine("gate_up", pointer, space, False) if t.persistent] == [
        replace(pointer, tma=True, persistent=True, min_block_m=0),
        replace(best, persistent=True, num_stages=3)]
    assert [t for t in refine("gate_up", replace(best, block_m=64), space, False) if t.persistent] == [
        replace(best, block_m=64, persistent=True)]
    assert not any(t.persistent for t in refine("gate_up", replace(best, block_m=32), space, False))
    assert not any(t.persistent for t in refine("gate_up", best, OmegaConf.merge(space, {"persistent": False}), False))
    assert robust_variants("gate_up", got[0], space) == []
    assert robust_variants("gate_up", best, space)  # tails, sweeps and absorbed tails of the per-tile kernel
    # refine (space.interleave): the best of 64+ rows interleaved, sweeps off; not small blocks
    space.interleave = True
    assert replace(best, interleave=True) in refine("gate_up", best, space, False)
    assert replace(best, interleave=True, sweep_n=0) in refine("down", replace(best, sweep_n=4), space, False)
    assert not any(t.interleave for t in refine("gate_up", replace(best, block_m=32), space, False))
    # with robust_interleave: persistent tiles get the interleaved walk alone; per-tile ones it too (sweeps
    # off: the walk does not take them), and an interleaved tile is not swept
    space.robust_interleave = True
    assert robust_variants("gate_up", got[0], space) == [replace(got[0], interleave=True)]
    swept = replace(best, sweep_n=4)
    assert replace(swept, interleave=True, sweep_n=0) in robust_variants("down", swept, space)
    assert not any(v.sweep_n for v in robust_variants("down", replace(best, interleave=True), space))


@pytest.mark.parametrize("slots", [False, True])
def test_choose_pair_charges_the_down_projections_own_block_map(slots):
    # a down projection whose (block_m, absorb_m) differs from the gate+up's pays one schedule build of its own
    # block map, absorb_m included; not where both run on a slot schedule (the forward builds none)
    from experiments.tune import _choose_pair
    from tritonmoe import TileConfig
    asked = []

    class Bench:
        def schedule_ms(self, block_m, absorb_m=0, busy_first=False):
            asked.append((block_m, absorb_m, busy_first))
            return 0.5

        def uses_slots(self, t):
            return slots

    up, down = TileConfig(block_m=128), TileConfig(block_m=128, absorb_m=32)
    best = {("gate_up", 128): (up, {"ms_p50": 1.0}), ("down", 128): (down, {"ms_p50": 2.0})}
    total, _, _ = _choose_pair(best, Bench())
    assert (total, asked) == ((3.0, []) if slots else (3.5, [(128, 32, False)]))


@pytest.mark.parametrize("T", [1, 2, 3])
def test_tuner_times_the_schedule_the_forward_runs(T, device):
    # up to SLOT_SCHEDULE_MAX_TOKENS tokens the forward runs its GEMMs on a slot schedule (no schedule built), so
    # the tuner must time them there too, except tiles that walk a built schedule's blocks (persistent, sweeps);
    # every candidate's output is checked against the default tiles' on the same kind of schedule
    import torch
    from dataclasses import replace
    from experiments import common
    from experiments.latency import make_problem
    from experiments.tune import _Bench
    from tritonmoe import TileConfig
    spec = common.model_spec("qwen2_57b_a14b", common.SMOKE_SHRINK)
    bench = _Bench(make_problem(spec, T, torch.float32, device, 0), spec, T, torch.float32, 0, 0)
    tiles = TileConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1)
    assert bench.schedule_for(tiles).slot_blocks == (T <= 2)
    walking = replace(tiles, block_m=64, block_n=32, persistent=True, tma=True)
    assert not bench.schedule_for(walking).slot_blocks
    interleaved = replace(tiles, interleave=True)  # walks a busy-first block list: a built schedule
    assert bench.schedule_for(interleaved).busy_first and not bench.schedule_for(interleaved).slot_blocks
    for kernel in ("gate_up", "down"):
        for t in (tiles, walking, interleaved):
            r = bench.measure(kernel, t)
            assert r["status"] == "ok" and r["rel_err"] < 1e-5, (kernel, t, r)


@pytest.mark.parametrize("model", MODELS)
def test_problem_inputs_do_not_depend_on_the_runs_largest_t(model):
    # a point's tokens and router weight are the same whichever other points a run measures (PERF_LOG v21:
    # drawing T rows gave Mixtral T = 4 other tokens, and another expert, in a run that stopped at T = 64)
    import torch
    from experiments import common
    from experiments.latency import make_problem
    spec = common.model_spec(model, common.SMOKE_SHRINK)
    small = make_problem(spec, 4, torch.float32, torch.device("cpu"), 0)
    big = make_problem(spec, 64, torch.float32, torch.device("cpu"), 0)
    assert small.x.shape == (4, 64) and big.x.shape == (64, 64)
    assert torch.equal(small.x, big.x[:4]) and torch.equal(small.router_weight, big.router_weight)
    assert torch.equal(small.w13, big.w13) and not torch.equal(big.x[:4], big.x[4:8])


@pytest.mark.parametrize("faster", ["tuned", "before"])
def test_forward_check_keeps_the_faster_forward(monkeypatch, faster):
    # the GEMMs' fastest pair is kept only where the experts' forward with it is at least as fast as with the
    # tiles the package ran before; otherwise those are kept, with their GEMM times for the table's record
    import torch
    from omegaconf import OmegaConf
    from experiments import tune
    from tritonmoe import TileConfig
    tuned = (TileConfig(block_m=64, block_n=128), TileConfig(block_m=64, block_n=256))
    before = (TileConfig(block_m=32), TileConfig(block_m=32, block_n=128))
    monkeypatch.setattr(tune, "get_tiles", lambda *a: before)
    slow = tuned if faster == "before" else before
    monkeypatch.setattr(tune.common, "time_ms", lambda fn, *a: [2.0 if fn.__defaults__[0] == slow else 1.0])

    class Bench:
        p = type("P", (), {"x": None, "w13": None, "w2": None})()
        weights = ids = None

        def measure(self, kernel, t):
            return {"status": "ok", "ms_p50": 0.5 if kernel == "gate_up" else 0.25}

    spec = type("S", (), {"top_k": 2, "num_experts": 8, "intermediate_size": 32, "hidden_size": 64})()
    pair = (3.0, (tuned[0], {"ms_p50": 2.0}), (tuned[1], {"ms_p50": 1.0}))
    e = OmegaConf.create({"forward_check_rounds": 3, "warmup_ms": 0, "rep_ms": 0})
    kept, check, rows = tune._forward_check(e, spec, 40, torch.float32, torch.device("cpu"), Bench(), pair, {})
    assert check == {"tuned_ms": 2.0 if faster == "before" else 1.0, "before_ms": 1.0 if faster == "before" else 2.0,
                     "kept": faster}
    assert [(r["candidate"], r["kept"]) for r in rows] == [("tuned", faster == "tuned"), ("before", faster == "before")]
    if faster == "tuned":
        assert kept is pair
    else:
        assert (kept[1][0], kept[2][0]) == before and kept[0] == 0.75
    # the same tiles as before: nothing to check
    monkeypatch.setattr(tune, "get_tiles", lambda *a: tuned)
    assert tune._forward_check(e, spec, 40, torch.float32, torch.device("cpu"), Bench(), pair, {}) == (pair, None, [])
