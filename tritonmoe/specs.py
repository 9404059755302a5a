"""Model specifications: the published shapes and routing of real MoE models.

A ``ModelSpec`` carries everything the kernels need to route and run one MoE layer
of a model: hidden size H, routed-expert width F, expert count E, top-k, how the
router scores and selects experts, and the optional shared expert. Values are taken
from each model's released ``config.json`` (Hugging Face hub) and its reference code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = [
    "ModelSpec",
    "MIXTRAL_8X7B",
    "QWEN2_57B_A14B",
    "DEEPSEEK_V3",
    "QWEN3_30B_A3B",
    "QWEN3_235B_A22B",
    "OLMOE_1B_7B",
    "ALL_SPECS",
    "get_spec",
]

SCORING_FUNCTIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class ModelSpec:
    """One MoE layer of a model.

    Routing: ``scores = scoring(router_logits)``; experts are selected on
    ``scores + correction_bias`` (DeepSeek-V3) or on ``scores``; with ``n_group > 1``
    only experts of the ``topk_group`` groups with the largest sum of their top
    ``group_score_topk`` selection scores are eligible; the weights are the unbiased
    scores of the chosen experts, renormalised to sum to one if ``renormalize``, then
    multiplied by ``routed_scaling_factor``. Ties go to the lowest expert (group) id.
    """

    name: str
    hidden_size: int                 # H
    intermediate_size: int           # F: width of one routed expert
    num_experts: int                 # E
    top_k: int                       # k experts per token
    scoring: str = "softmax"         # "softmax" over all E, or elementwise "sigmoid"
    renormalize: bool = True         # divide the k weights by their sum
    n_group: int = 1                 # expert groups for group-limited selection (1: off)
    topk_group: int = 1              # groups kept per token
    group_score_topk: int = 2        # a group's score: sum of its top-n selection scores
    routed_scaling_factor: float = 1.0
    uses_correction_bias: bool = False  # selection on scores + e_score_correction_bias
    router_fp32: bool = False        # the model computes router logits in float32
    shared_intermediate_size: int = 0   # width of the always-on shared expert (0: none)
    shared_expert_gate: bool = False    # shared output scaled by sigmoid(x . g) (Qwen2-MoE)

    def __post_init__(self):
        for field in ("hidden_size", "intermediate_size", "num_experts", "top_k", "n_group", "topk_group",
                      "group_score_topk"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelSpec.{field} must be a positive int, got {value!r}")
        if self.scoring not in SCORING_FUNCTIONS:
            raise ValueError(f"ModelSpec.scoring must be one of {SCORING_FUNCTIONS}, got {self.scoring!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"ModelSpec.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.num_experts % self.n_group:
            raise ValueError(f"ModelSpec.num_experts={self.num_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"ModelSpec.topk_group={self.topk_group} exceeds n_group={self.n_group}")
        group_size = self.num_experts // self.n_group
        if self.n_group > 1 and self.group_score_topk > group_size:
            raise ValueError(f"ModelSpec.group_score_topk={self.group_score_topk} exceeds the group size {group_size}")
        if self.top_k > self.topk_group * group_size:
            raise ValueError(f"ModelSpec.top_k={self.top_k} exceeds the experts in the kept groups "
                             f"({self.topk_group} x {group_size})")
        if self.shared_intermediate_size < 0:
            raise ValueError("ModelSpec.shared_intermediate_size must be >= 0")
        if self.shared_expert_gate and not self.shared_intermediate_size:
            raise ValueError("ModelSpec.shared_expert_gate needs a shared expert (shared_intermediate_size > 0)")

    @property
    def group_size(self) -> int:
        return self.num_experts // self.n_group

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_intermediate_size > 0

    def replace(self, **changes) -> "ModelSpec":
        """A copy with some fields changed (e.g. small shapes for tests), validated again."""
        return dataclasses.replace(self, **changes)


# Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1): softmax over 8 experts, top-2, renormalised.
MIXTRAL_8X7B = ModelSpec(
    name="mixtral_8x7b", hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2,
    scoring="softmax", renormalize=True,
)

# Qwen2-57B-A14B (Qwen/Qwen2-57B-A14B): softmax, top-8 of 64, norm_topk_prob=false;
# shared expert of width 20480 scaled by sigmoid(shared_expert_gate(x)).
QWEN2_57B_A14B = ModelSpec(
    name="qwen2_57b_a14b", hidden_size=3584, intermediate_size=2560, num_experts=64, top_k=8,
    scoring="softmax", renormalize=False, shared_intermediate_size=20480, shared_expert_gate=True,
)

# DeepSeek-V3 (deepseek-ai/DeepSeek-V3): sigmoid scores, selection on scores +
# e_score_correction_bias, 8 groups of 32 with the 4 best groups (sum of top-2) kept,
# top-8, renormalised, x2.5; one shared expert of width 2048; router in float32.
DEEPSEEK_V3 = ModelSpec(
    name="deepseek_v3", hidden_size=7168, intermediate_size=2048, num_experts=256, top_k=8,
    scoring="sigmoid", renormalize=True, n_group=8, topk_group=4, group_score_topk=2,
    routed_scaling_factor=2.5, uses_correction_bias=True, router_fp32=True, shared_intermediate_size=2048,
)

# Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B): softmax, top-8 of 128, norm_topk_prob=true, no shared expert.
QWEN3_30B_A3B = ModelSpec(
    name="qwen3_30b_a3b", hidden_size=2048, intermediate_size=768, num_experts=128, top_k=8,
    scoring="softmax", renormalize=True,
)

# Qwen3-235B-A22B (Qwen/Qwen3-235B-A22B): softmax, top-8 of 128, norm_topk_prob=true.
QWEN3_235B_A22B = ModelSpec(
    name="qwen3_235b_a22b", hidden_size=4096, intermediate_size=1536, num_experts=128, top_k=8,
    scoring="softmax", renormalize=True,
)

# OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924): softmax, top-8 of 64, norm_topk_prob=false.
OLMOE_1B_7B = ModelSpec(
    name="olmoe_1b_7b", hidden_size=2048, intermediate_size=1024, num_experts=64, top_k=8,
    scoring="softmax", renormalize=False,
)

ALL_SPECS = {s.name: s for s in (MIXTRAL_8X7B, QWEN2_57B_A14B, DEEPSEEK_V3, QWEN3_30B_A3B, QWEN3_235B_A22B,
                                  OLMOE_1B_7B)}


def get_spec(name: str) -> ModelSpec:
    """The spec called ``name`` (e.g. ``"deepseek_v3"``)."""
    try:
        return ALL_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {sorted(ALL_SPECS)}") from None
