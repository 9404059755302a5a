"""Test-only helpers: routing schemes at any (E, k)."""
from __future__ import annotations

import math

from tritonmoe.specs import DEEPSEEK_V3, MIXTRAL_8X7B, QWEN2_57B_A14B, ModelSpec

SCHEMES = ("mixtral", "qwen2", "deepseek_v3")


def scheme_spec(scheme: str, E: int, k: int, H: int = 40, F: int = 24) -> ModelSpec:
    """A small spec with ``scheme``'s routing at E experts and top-k.

    mixtral: softmax, renormalised. qwen2: softmax, not renormalised. deepseek_v3: sigmoid +
    correction bias, group-limited (up to 8 groups, half kept, top-2 group score), x2.5.
    """
    if scheme == "mixtral":
        return MIXTRAL_8X7B.replace(num_experts=E, top_k=k, hidden_size=H, intermediate_size=F)
    if scheme == "qwen2":
        return QWEN2_57B_A14B.replace(num_experts=E, top_k=k, hidden_size=H, intermediate_size=F,
                                      shared_intermediate_size=0, shared_expert_gate=False)
    if scheme == "deepseek_v3":
        n_group = 8 if E >= 16 else (2 if E >= 4 else 1)
        group_size = E // n_group
        topk_group = max(n_group // 2, math.ceil(k / group_size)) if n_group > 1 else 1
        return DEEPSEEK_V3.replace(num_experts=E, top_k=k, hidden_size=H, intermediate_size=F, n_group=n_group,
                                   topk_group=topk_group, group_score_topk=min(2, group_size),
                                   shared_intermediate_size=0)
    raise ValueError(scheme)


# (E, k) pairs of the grid: E in {1, 2, 8, 64, 256}, k in {1, 2, 8}, k <= E.
EK = [(E, k) for E in (1, 2, 8, 64, 256) for k in (1, 2, 8) if k <= E]
TOKENS = (0, 1, 3, 17, 64, 300)
