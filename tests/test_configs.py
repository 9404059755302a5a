"""Tile tables: validation, the M-bucket lookup, and the shipped tables themselves."""
import json

import pytest
import torch

from tritonmoe import TileConfig, configs
from tritonmoe.specs import get_spec

BENCHMARK_MODELS = ("mixtral_8x7b", "qwen2_57b_a14b", "deepseek_v3")


def test_tile_config_validation():
    for bad in (dict(block_m=24), dict(block_n=8), dict(num_warps=0), dict(split_k=0), dict(group_m=1.5),
                dict(tma=1), dict(expert_groups="yes"), dict(sweep_n=-1), dict(sweep_n=True), dict(sweep_n=2.0),
                dict(min_block_m=8), dict(min_block_m=-16)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TileConfig(**bad)


def test_bucket_lookup(monkeypatch):
    # the nearest tuned bucket at or below T; below the smallest, the smallest
    table = {"E=8,N=32,K=64,dtype=float16": {
        str(m): {"gate_up": dict(block_m=bm, block_n=32), "down": dict(block_m=bm, block_n=64, split_k=2)}
        for m, bm in ((4, 16), (64, 32), (512, 128))}}
    monkeypatch.setattr(configs, "_load", lambda name: table if name == "FAKE_GPU" else {})
    configs._tiles.cache_clear()
    try:
        pick = lambda T: configs._tiles(T, 2, 8, 32, 64, torch.float16, "FAKE_GPU")  # noqa: E731
        assert pick(1)[0].block_m == 16 and pick(63)[0].block_m == 16
        assert pick(64)[0].block_m == 32 and pick(511)[1].block_n == 64 and pick(511)[1].split_k == 2
        assert pick(10_000)[0].block_m == 128
        # another problem: the defaults, one block_m for both GEMMs
        up, down = configs._tiles(64, 2, 16, 32, 64, torch.float16, "FAKE_GPU")
        assert up.block_m == down.block_m
    finally:
        configs._tiles.cache_clear()


def test_chunk_tokens_lookup(monkeypatch):
    # a bucket may say "run in chunks of n tokens"; buckets without it, and other problems, run whole
    pair = {"gate_up": dict(block_m=64), "down": dict(block_m=64)}
    table = {"E=8,N=32,K=64,dtype=float16": {"64": pair, "1024": {**pair, "chunk_tokens": 512}}}
    monkeypatch.setattr(configs, "_load", lambda name: table if name == "FAKE_GPU" else {})
    configs._chunk.cache_clear()
    try:
        assert configs._chunk(1000, 8, 32, 64, torch.float16, "FAKE_GPU") is None
        assert configs._chunk(5000, 8, 32, 64, torch.float16, "FAKE_GPU") == 512
        assert configs._chunk(5000, 16, 32, 64, torch.float16, "FAKE_GPU") is None
    finally:
        configs._chunk.cache_clear()


@pytest.mark.parametrize("path", sorted(configs.CONFIG_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_tables_are_valid(path):
    table = json.loads(path.read_text())
    assert table["configs"], "empty table"
    for key, buckets in table["configs"].items():
        assert key in table["sources"], f"{key}: no source results named"
        for m, pair in buckets.items():
            up, down = TileConfig(**pair["gate_up"]), TileConfig(**pair["down"])
            assert up.split_k == 1, f"{key} M={m}: the fused gate+up has no split-K"
            assert set(pair) <= {"gate_up", "down", "chunk_tokens"}, f"{key} M={m}: unknown fields {set(pair)}"
            if "chunk_tokens" in pair:
                assert 0 < pair["chunk_tokens"] < int(m), f"{key} M={m}: chunks must be smaller than the bucket"
                assert str(m) in table["sources"][key].get("chunk_tokens", {}), f"{key} M={m}: chunk source unnamed"
    # the tables serve the models the benchmark runs
    for spec in map(get_spec, BENCHMARK_MODELS):
        key = configs.problem_key(spec.num_experts, spec.intermediate_size, spec.hidden_size, torch.bfloat16)
        assert key in table["configs"], spec.name
