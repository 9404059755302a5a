"""The skew generator of the experiments: exact per-expert counts, k distinct experts per token."""
import pytest
import torch

from experiments.skew import expert_counts, skewed_topk_ids

SKEWS = [0, 0.5, 1.0, 1.5, 2.0, "hot"]


@pytest.mark.parametrize("skew", SKEWS)
@pytest.mark.parametrize("T,k,E", [(1, 1, 1), (1, 8, 256), (3, 2, 8), (128, 8, 64), (512, 4, 16), (37, 8, 8)])
def test_exact_counts_and_distinct_choices(T, k, E, skew):
    counts = expert_counts(T, k, E, skew)
    assert len(counts) == E and sum(counts) == T * k and max(counts) <= T and min(counts) >= 0
    assert counts == sorted(counts, reverse=True) or skew == "hot"   # popularity by rank
    ids = skewed_topk_ids(T, k, E, skew, seed=1)
    assert ids.shape == (T, k) and ids.dtype == torch.int32
    assert all(len(set(row.tolist())) == k for row in ids), "a token got one expert twice"
    got = sorted(torch.bincount(ids.flatten().long(), minlength=E).tolist(), reverse=True)
    assert got == sorted(counts, reverse=True)


def test_skew_shapes_the_counts():
    uniform, zipf2, hot = (expert_counts(1000, 2, 64, s) for s in (0, 2.0, "hot"))
    assert max(uniform) - min(uniform) <= 1
    assert zipf2[0] == 1000 and zipf2[-1] <= 2          # capped at T, long tail
    assert hot[0] == 1000 and max(hot[1:]) - min(hot[1:]) <= 1
    assert expert_counts(10, 1, 8, "hot")[0] == 5        # half of the slots when k = 1
    assert expert_counts(7, 1, 1, "hot") == [7]


def test_seeded():
    a, b = skewed_topk_ids(64, 8, 32, 1.0, seed=5), skewed_topk_ids(64, 8, 32, 1.0, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, skewed_topk_ids(64, 8, 32, 1.0, seed=6))


@pytest.mark.parametrize("args,match", [((4, 0, 8, 1.0), "top_k"), ((4, 9, 8, 1.0), "top_k"),
                                        ((4, 2, 8, -1.0), "skew"), ((4, 2, 8, "cold"), "skew")])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        expert_counts(*args)
