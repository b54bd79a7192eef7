"""Routers: from router logits to (top-k weights, top-k expert ids), one strategy per scheme.

Every strategy is a frozen dataclass with one call signature,
`router(router_logits_TG, bias_G=None) -> (weights_TK float32, ids_TK int64)` (TopKSoftmaxRouter keeps
float64 weights for float64 logits), and two facts the MoE
layer reads: `float32_logits` (compute the gate matmul in float32, as the DeepSeek family does) and
`needs_bias` (the scheme selects with a per-expert `e_score_correction_bias` checkpoint tensor).
`RouterConfig` (moe/router_config.py) holds the config.json routing fields, validated; `make_router` turns it
into a strategy.
Each strategy repeats its reference implementation in transformers op for op (the float32 casts, the
group score, `topk(sorted=False)`, the epsilon of the renormalisation), so that float64 parity holds.

Legend: T tokens, G (logical) experts, K top-k, P expert groups, S experts per group (G = P * S); the
letters of moe/layer.py and moe/placement.py, where E is a rank's local experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from moelink.kernels.router_topk import reference_route_topk, reference_softmax_biased_topk

from .router_config import SCORING_FUNCS, TOPK_METHODS, RouterConfig  # noqa: F401 (re-exported)


class Router(Protocol):
    top_k: int
    float32_logits: bool
    needs_bias: ClassVar[bool]

    def __call__(self, router_logits_TG: torch.Tensor, bias_G: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def route_args(self) -> dict | None:
        """The arguments of the kernels' fused `route_topk` op that compute this router (kernels/router_topk.py),
        or None when it has no fused form (the layer then calls the router)."""
        ...


@dataclass(frozen=True)
class SoftmaxTopKRouter:
    """Softmax over all experts, keep the top-k, optionally renormalise them to sum to 1, then scale.

    Qwen3-MoE (`norm_topk_prob`), Mixtral (always renormalised, which equals a softmax over the top-k
    logits) and DeepSeek-V2 "greedy" (never renormalised, scaled by routed_scaling_factor, float32 gate).
    The softmax runs in float32 as in the reference models, which matters for exact parity in float64.
    """

    top_k: int
    renormalize: bool
    routed_scaling_factor: float = 1.0
    float32_logits: bool = False
    needs_bias: ClassVar[bool] = False

    def route_args(self) -> dict:
        """The fused router op's arguments for this scheme (kernels/router_topk.py)."""
        return dict(method="greedy", renormalize=self.renormalize, scale=self.routed_scaling_factor)

    def __call__(self, router_logits_TG: torch.Tensor, bias_G: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights_TK float32, ids_TK int64)."""
        _no_bias(self, bias_G)
        return reference_route_topk(router_logits_TG, self.top_k, **self.route_args())


@dataclass(frozen=True)
class SoftmaxGroupLimitedRouter:
    """DeepSeek-V2 "group_limited_greedy": softmax scores; a group's score is its best expert's; the top-k
    is taken within the `topk_group` best groups (the others' scores set to 0); then scaled."""

    top_k: int
    n_group: int
    topk_group: int
    renormalize: bool = False
    routed_scaling_factor: float = 1.0
    float32_logits: bool = True
    needs_bias: ClassVar[bool] = False

    def route_args(self) -> dict:
        """The fused router op's arguments for this scheme (kernels/router_topk.py)."""
        return dict(method="group_limited_greedy", renormalize=self.renormalize, scale=self.routed_scaling_factor,
                    n_group=self.n_group, topk_group=self.topk_group)

    def __call__(self, router_logits_TG: torch.Tensor, bias_G: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights_TK float32, ids_TK int64)."""
        _no_bias(self, bias_G)
        return reference_route_topk(router_logits_TG, self.top_k, **self.route_args())


@dataclass(frozen=True)
class SigmoidGroupLimitedRouter:
    """DeepSeek-V3 / GLM-4-MoE "noaux_tc": sigmoid scores; selection on scores + bias_G (the checkpoint's
    e_score_correction_bias, float32), groups ranked by the sum of their top-2 biased scores; the weights
    are the unbiased scores of the chosen experts, renormalised (denominator + 1e-20), then scaled."""

    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float = 1.0
    float32_logits: bool = True
    needs_bias: ClassVar[bool] = True

    def route_args(self) -> dict:
        """The fused router op's arguments for this scheme (kernels/router_topk.py)."""
        return dict(method="noaux_tc", renormalize=self.norm_topk_prob, scale=self.routed_scaling_factor,
                    n_group=self.n_group, topk_group=self.topk_group)

    def __call__(self, router_logits_TG: torch.Tensor, bias_G: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights_TK float32, ids_TK int64). bias_G None = no correction bias."""
        return reference_route_topk(router_logits_TG, self.top_k, **self.route_args(), bias_G=bias_G)


@dataclass(frozen=True)
class SoftmaxBiasedRouter(SigmoidGroupLimitedRouter):
    """LongCat-Flash: noaux_tc's selection (scores + bias_G, the unbiased scores as weights, optionally renormalised,
    then scaled) on softmax scores over every expert, its zero-computation ones included
    (kernels/router_topk.reference_softmax_biased_topk). No fused form yet: the layer calls it (route_args None) and
    counts the load itself."""

    def route_args(self) -> None:  # type: ignore[override]
        return None

    def __call__(self, router_logits_TG: torch.Tensor, bias_G: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights_TK float32, ids_TK int64)."""
        return reference_softmax_biased_topk(router_logits_TG, self.top_k, bias_G, self.norm_topk_prob,
                                             self.routed_scaling_factor, self.n_group, self.topk_group)


class _Unfused:
    """A scheme the kernels' fused `route_topk` op has no method for: route_args None, so the layer calls the
    router itself."""

    def route_args(self) -> None:
        return None


def _weights(weights_TK: torch.Tensor) -> torch.Tensor:
    """Routing weights computed in the logits' dtype, as float32, or float64 for float64 logits: transformers keeps
    them in the logits' dtype, and a float32 round would cost float64 parity ~1e-5 relative after the experts."""
    return weights_TK if weights_TK.dtype == torch.float64 else weights_TK.float()


class _TopKOfLogits(_Unfused):
    """The top-k of the logits themselves (no scores over every expert first), each weighed from the k chosen
    logits alone by the subclass's `weigh`."""

    top_k: int

    def weigh(self, top_TK: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, router_logits_TG: torch.Tensor, bias_G: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights_TK float32, or float64 for float64 logits; ids_TK int64)."""
        _no_bias(self, bias_G)
        top_TK, ids_TK = torch.topk(router_logits_TG, self.top_k, dim=-1)
        return _weights(self.weigh(top_TK)), ids_TK


@dataclass(frozen=True)
class TopKSoftmaxRouter(_TopKOfLogits):
    """gpt-oss: top-k of the logits (the router linear's bias already added by the layer), then a softmax over
    the k chosen logits alone, in the logits' dtype, as transformers' GptOssTopKRouter computes it (in exact
    arithmetic a renormalised softmax over all experts; in bf16 the rounding differs, so it is computed as
    transformers does)."""

    top_k: int
    float32_logits: bool = False
    needs_bias: ClassVar[bool] = False

    def weigh(self, top_TK: torch.Tensor) -> torch.Tensor:
        return torch.softmax(top_TK, dim=-1, dtype=top_TK.dtype)


@dataclass(frozen=True)
class SparseMixerRouter(_Unfused):
    """Phi-3.5-MoE's SparseMixer (transformers' `sparsemixer` in eval mode; arXiv 2409.12136): at inference its
    sampled choices are argmaxes and its gradient estimator is gone, which leaves two picks from the logits s:
    1. pick e1 = argmax s; its weight is softmax(s masked)[e1], the mask leaving out every expert j with
       (s[e1] - s[j]) / max(|s[j]|, s[e1]) > 2 * jitter_eps;
    2. with s[e1] set to -inf, pick e2 = the argmax of the rest; its weight is softmax(those masked)[e2], the mask
       leaving out every j with (s[e2] - s[j]) / max(|s[j]|, s[e2]) > 2 * jitter_eps (e1 stays out).
    Neither weight is renormalised against the other. The logits' dtype throughout, as transformers computes it
    (the gate runs in the model dtype). Plain torch: this is the scheme's reference and its implementation on every
    device."""

    top_k: int
    jitter_eps: float
    float32_logits: bool = False
    needs_bias: ClassVar[bool] = False

    def __call__(self, router_logits_TG: torch.Tensor, bias_G: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights_TK float32, or float64 for float64 logits; ids_TK int64), K = 2."""
        _no_bias(self, bias_G)
        s_TG = router_logits_TG
        w1_T1, e1_T1 = _sparsemixer_pick(s_TG, s_TG, self.jitter_eps)
        rest_TG = torch.scatter(s_TG, -1, e1_T1, float("-inf"))
        w2_T1, e2_T1 = _sparsemixer_pick(rest_TG, s_TG, self.jitter_eps)
        return _weights(torch.cat([w1_T1, w2_T1], dim=-1)), torch.cat([e1_T1, e2_T1], -1)


def _sparsemixer_pick(masked_TG: torch.Tensor, s_TG: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One SparseMixer pick: the argmax of `masked_TG` (the logits with earlier picks at -inf) and its weight, the
    softmax over the experts whose logit (in `s_TG`) is within the relative distance 2 * eps of the pick's."""
    top_T1, ids_T1 = masked_TG.max(dim=-1, keepdim=True)
    factor_TG = s_TG.abs().clamp(min=top_T1)
    out_TG = ((top_T1 - s_TG) / factor_TG) > (2 * eps)
    gates_TG = torch.softmax(masked_TG.masked_fill(out_TG, float("-inf")), dim=-1)
    return gates_TG.gather(-1, ids_T1), ids_T1


@dataclass(frozen=True)
class TopKSigmoidRouter(_TopKOfLogits):
    """Llama 4: the top-k of the logits, each weighted by the sigmoid of its own logit (never renormalised), as
    transformers' Llama4Router computes it: topk on the logits, sigmoid in float32, cast back to the logits' dtype
    (so the weights are what transformers multiplies the experts' input by: MoEConfig.router_weight_on_input).
    Selecting on the logits, not on sigmoid scores, keeps the choice of experts whose float32 sigmoids round to the
    same value."""

    top_k: int
    float32_logits: bool = False
    # The k sigmoids divided by their sum (Flint's norm_topk_prob, in the weights' dtype as transformers divides);
    # Llama 4's never are.
    norm_topk_prob: bool = False
    needs_bias: ClassVar[bool] = False

    def weigh(self, top_TK: torch.Tensor) -> torch.Tensor:
        weights_TK = torch.sigmoid(top_TK.float()).to(top_TK.dtype)
        return weights_TK / weights_TK.sum(dim=-1, keepdim=True) if self.norm_topk_prob else weights_TK


def _no_bias(router, bias_G) -> None:
    if bias_G is not None:
        raise ValueError(f"{type(router).__name__} takes no e_score_correction_bias: only "
                         "topk_method='noaux_tc' (and DeepSeek-V4's sqrtsoftplus) selects with one.")


def make_router(cfg: RouterConfig) -> Router:
    """The strategy for `cfg`'s scheme (the only place a RouterConfig becomes a router)."""
    if cfg.scoring_func == "sqrtsoftplus":  # DeepSeek-V4 (its hash layers build HashRouter: moe/token_routing.py)
        from .token_routers import SqrtSoftplusRouter

        return SqrtSoftplusRouter(cfg.top_k, cfg.routed_scaling_factor, cfg.float32_logits)
    if cfg.topk_method == "topk_sigmoid":  # Llama 4
        return TopKSigmoidRouter(cfg.top_k, cfg.float32_logits, cfg.norm_topk_prob)
    if cfg.scoring_func == "sigmoid":
        return SigmoidGroupLimitedRouter(cfg.top_k, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
                                         cfg.routed_scaling_factor, cfg.float32_logits)
    if cfg.topk_method == "topk_softmax":
        return TopKSoftmaxRouter(cfg.top_k, cfg.float32_logits)
    if cfg.topk_method == "sparsemixer":  # Phi-3.5-MoE
        return SparseMixerRouter(cfg.top_k, cfg.jitter_eps, cfg.float32_logits)
    if cfg.topk_method == "noaux_tc":  # softmax scores, selected with a correction bias (LongCat-Flash)
        return SoftmaxBiasedRouter(cfg.top_k, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
                                   cfg.routed_scaling_factor, cfg.float32_logits)
    if cfg.topk_method == "group_limited_greedy":
        return SoftmaxGroupLimitedRouter(cfg.top_k, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
                                         cfg.routed_scaling_factor, cfg.float32_logits)
    return SoftmaxTopKRouter(cfg.top_k, cfg.norm_topk_prob, cfg.routed_scaling_factor, cfg.float32_logits)
