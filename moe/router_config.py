"""The routing fields of config.json (`RouterConfig`), validated: plain data the engine's configuration reads
without loading the routers or their kernels (moe/router.py turns one into a strategy with `make_router`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
# Which `topk_method`s go with each `scoring_func` (DeepSeek-V2: softmax; DeepSeek-V3 / GLM-4-MoE: sigmoid;
# DeepSeek-V4: sqrt(softplus), selected with a correction bias, one group: moe/token_routers.py).
# "topk_softmax" is no config.json value: the gpt-oss reader names it for its top-k-then-softmax router; nor is
# "sparsemixer": the PhiMoE reader names it for Phi-3.5-MoE's SparseMixer routing.
# "topk_sigmoid" is none either: the Llama 4 reader names it for its top-k-then-sigmoid router.
TOPK_METHODS = {"softmax": ("greedy", "group_limited_greedy", "topk_softmax", "noaux_tc", "sparsemixer"),
                "sigmoid": ("noaux_tc", "topk_sigmoid"),
                "sqrtsoftplus": ("noaux_tc",)}
_GROUPED = ("group_limited_greedy", "noaux_tc")


def _bad(field: str, value, allowed: str) -> ValueError:
    return ValueError(f"config.json {field}={value!r} is not supported: {allowed}.")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class RouterConfig:
    """The routing fields of config.json, checked together.

    scoring_func / topk_method: "softmax" with "greedy" (top-k over all experts), "group_limited_greedy"
    (DeepSeek-V2: top-k within the `topk_group` groups of highest max score) or "topk_softmax" (gpt-oss: top-k
    of the logits, then a softmax over those k alone; norm_topk_prob must be true); "sigmoid" with "noaux_tc"
    (DeepSeek-V3, GLM-4-MoE: selection on scores + e_score_correction_bias, groups ranked by the sum of
    their top-2); "softmax" with "noaux_tc" (LongCat-Flash: the same selection on softmax scores over every expert,
    zero-computation ones included); "softmax" with "sparsemixer" (Phi-3.5-MoE's SparseMixer at inference: two
    picks, each the best remaining logit, weighted by a softmax over the logits within `jitter_eps` of it:
    moe/router.SparseMixerRouter; top_k 2, never renormalised nor scaled). n_group / topk_group apply to the
    grouped methods only. norm_topk_prob renormalises the
    k weights to sum to 1; routed_scaling_factor multiplies them after that. float32_logits: the gate
    matmul runs in float32 whatever the model dtype (transformers' DeepSeek-V2/V3 and GLM-4-MoE). "sigmoid" with
    "topk_sigmoid" (Llama 4: the top-k of the logits, each weighted by its own sigmoid, renormalised only with
    norm_topk_prob (Flint's; never Llama 4's):
    moe/router.TopKSigmoidRouter).
    """

    num_experts: int
    top_k: int
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    float32_logits: bool = False
    # sparsemixer only: config.json's router_jitter_noise, which at inference is the relative distance from a pick's
    # logit (2 * jitter_eps) beyond which an expert is left out of that pick's softmax.
    jitter_eps: float = 0.0

    def __post_init__(self) -> None:
        G, K = self.num_experts, self.top_k
        if not _is_int(G) or G < 1:
            raise _bad("num_experts", G, "the number of routed experts must be a positive integer")
        if not _is_int(K) or not 1 <= K <= G:
            raise _bad("num_experts_per_tok", K, f"must be an integer in [1, {G}] (the number of routed experts)")
        if self.scoring_func not in SCORING_FUNCS:
            raise _bad("scoring_func", self.scoring_func, f"choose from {', '.join(SCORING_FUNCS)}")
        methods = TOPK_METHODS[self.scoring_func]
        if self.topk_method not in methods:
            raise _bad("topk_method", self.topk_method,
                       f"with scoring_func={self.scoring_func!r} choose from {', '.join(methods)}")
        if not isinstance(self.norm_topk_prob, bool):
            raise _bad("norm_topk_prob", self.norm_topk_prob, "must be true or false")
        s = self.routed_scaling_factor
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
            raise _bad("routed_scaling_factor", s, "must be a finite number > 0")
        if not isinstance(self.float32_logits, bool):
            raise ValueError(f"RouterConfig float32_logits={self.float32_logits!r} must be a bool.")
        if self.topk_method in _GROUPED:
            self._check_groups()
        if self.topk_method == "sparsemixer":
            self._check_sparsemixer()
        elif self.jitter_eps != 0.0:
            raise ValueError(f"RouterConfig jitter_eps={self.jitter_eps!r} applies to topk_method='sparsemixer' only.")
        if self.topk_method == "topk_sigmoid" and self.routed_scaling_factor != 1.0:
            raise ValueError("RouterConfig topk_method='topk_sigmoid' weighs each pick by its own sigmoid "
                             "(renormalised with norm_topk_prob: Flint's): it needs routed_scaling_factor=1.0.")
        if self.topk_method == "topk_softmax" and (not self.norm_topk_prob or self.routed_scaling_factor != 1.0):
            raise ValueError("RouterConfig topk_method='topk_softmax' is a softmax over the k chosen logits: it needs "
                             "norm_topk_prob=True and routed_scaling_factor=1.0.")

    def _check_sparsemixer(self) -> None:
        if self.top_k != 2:  # transformers' sparsemixer makes exactly two picks, whatever num_experts_per_tok says
            raise _bad("num_experts_per_tok", self.top_k, "SparseMixer routing (PhiMoE) picks exactly 2 experts")
        if self.num_experts < 2:
            raise _bad("num_local_experts", self.num_experts, "SparseMixer routing (PhiMoE) needs at least 2 experts")
        if self.norm_topk_prob or self.routed_scaling_factor != 1.0:
            raise ValueError("RouterConfig topk_method='sparsemixer' weighs each pick by its own masked softmax: it "
                             "needs norm_topk_prob=False and routed_scaling_factor=1.0.")
        e = self.jitter_eps
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not (math.isfinite(e) and e >= 0):
            raise _bad("router_jitter_noise", e, "must be a finite number >= 0")

    def _check_groups(self) -> None:
        G, K, P, TP = self.num_experts, self.top_k, self.n_group, self.topk_group
        if not _is_int(P) or P < 1 or G % P:
            raise _bad("n_group", P, f"must be a positive integer that divides the {G} routed experts (n_routed_experts)")
        if not _is_int(TP) or not 1 <= TP <= P:
            raise _bad("topk_group", TP, f"must be an integer in [1, n_group={P}]")
        S = G // P
        if self.topk_method == "noaux_tc" and S < 2:
            raise _bad("n_group", P, f"noaux_tc ranks a group by its top-2 experts, so each of the n_group groups "
                                     f"needs >= 2 of the {G} routed experts (n_group <= {G // 2})")
        if K > TP * S:
            raise _bad("num_experts_per_tok", K, f"must be <= the {TP * S} experts of the topk_group={TP} chosen "
                                                 f"groups ({S} experts in each of n_group={P})")


__all__ = ["RouterConfig", "SCORING_FUNCS", "TOPK_METHODS"]
