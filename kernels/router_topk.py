"""Router top-k: from router logits to (top-k weights, top-k expert ids), with the decode step's two
companions (padding rows routed nowhere, the per-expert load count) in the same op. Plain torch: the one
implementation of the routing math (moe/router.py's strategies call it), the oracle of
kernels/triton_router_topk.py and the CPU path.

Legend: T tokens, G experts, K top-k, P expert groups, S experts per group (G = P * S).

Methods (config.json's topk_method; moe/router.RouterConfig validates them), op for op as transformers:
- "greedy": softmax over all experts in float32, torch.topk (sorted), optionally renormalised (w / sum),
  scaled when the factor is not 1 (Qwen3-MoE, Mixtral, DeepSeek-V2-Lite).
- "group_limited_greedy" (DeepSeek-V2): softmax scores; a group's score is its best expert's; experts outside
  the `topk_group` best groups get score 0; topk(sorted=False); optionally renormalised (w / (sum + 1e-20));
  scaled.
- "noaux_tc" (DeepSeek-V3, GLM-4-MoE): sigmoid scores; selection on scores + bias_G, groups ranked by the sum
  of their top-2 biased scores, experts outside the chosen groups at -inf; the weights are the unbiased scores
  of the chosen experts, optionally renormalised (w / (sum + 1e-20)); scaled.
- "sqrtsoftplus" (DeepSeek-V4's learned-routing layers): sqrt(softplus(x)) scores in float32 (float64 for float64
  logits; transformers computes them in the logits' dtype, so bf16 logits give bf16 scores there: ours are the
  more exact); selection on scores + bias_G, no groups; the weights are the unbiased scores of the chosen experts,
  renormalised (w / (sum + 1e-20)) and scaled.
valid_T (bool [T], padded decode graphs): rows that are False get ids -1 (no expert; weights as computed).
counts_G (int64 [G], the layer's row of moe/stats.MoEStats): += 1 per (row, chosen expert) with id >= 0.

Why one op: at batch 1 these are ~11 launches per MoE layer (cast, softmax, topk, sum, div, the valid-row
mask, four for the count), each a few hundred bytes; fused, one launch reads the logits and writes K ids and
weights.
"""
from __future__ import annotations

import torch

METHODS = ("greedy", "group_limited_greedy", "noaux_tc", "sqrtsoftplus")
BIASED = ("noaux_tc", "sqrtsoftplus")  # the methods that select on scores + an e_score_correction_bias


def check_method(method: str, bias_G) -> None:
    """`method` is one of METHODS, and takes a bias_G only if it is one of BIASED (every backend's check)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: choose from {', '.join(METHODS)}.")
    if bias_G is not None and method not in BIASED:
        raise ValueError(f"bias_G is only taken by methods {BIASED} (an e_score_correction_bias), not {method!r}.")


def reference_route_topk(
    logits_TG: torch.Tensor, top_k: int, method: str = "greedy", renormalize: bool = False, scale: float = 1.0,
    n_group: int = 1, topk_group: int = 1, bias_G: torch.Tensor | None = None, valid_T: torch.Tensor | None = None,
    counts_G: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK float32, ids_TK int64) of `method` (module docstring); updates counts_G in place."""
    check_method(method, bias_G)
    if method == "greedy":
        weights_TK, ids_TK = _greedy(logits_TG, top_k, renormalize, scale)
    elif method == "group_limited_greedy":
        weights_TK, ids_TK = _softmax_grouped(logits_TG, top_k, renormalize, scale, n_group, topk_group)
    elif method == "noaux_tc":
        weights_TK, ids_TK = _sigmoid_grouped(logits_TG, top_k, renormalize, scale, n_group, topk_group, bias_G)
    else:
        weights_TK, ids_TK = _sqrtsoftplus(logits_TG, top_k, renormalize, scale, bias_G)
    if valid_T is not None:
        ids_TK = ids_TK.masked_fill(~valid_T[:, None], -1)
    if counts_G is not None and ids_TK.numel():
        # index_add_, not bincount (a host sync on CUDA); ids < 0 count for nothing. Without padding rows every
        # id is an expert's (top-k picks one per slot): ones, two ops where the masked count takes four.
        ids = ids_TK.reshape(-1)
        if valid_T is None:
            counts_G.index_add_(0, ids, torch.ones(ids.shape, dtype=counts_G.dtype, device=ids.device))
        else:
            counts_G.index_add_(0, ids.clamp(min=0), (ids >= 0).to(counts_G.dtype))
    return weights_TK, ids_TK


def reference_gate_route_topk(
    x_TD: torch.Tensor, gate_GD: torch.Tensor, gate_bias_G: torch.Tensor | None, top_k: int, method: str = "greedy",
    renormalize: bool = False, scale: float = 1.0, n_group: int = 1, topk_group: int = 1,
    bias_G: torch.Tensor | None = None, valid_T: torch.Tensor | None = None, counts_G: torch.Tensor | None = None,
    counters_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate matmul, then route_topk: (weights_TK, ids_TK, logits_TG), logits = x gateᵀ (+ gate bias) with x in
    the gate's dtype (the DeepSeek family's float32 gate). One launch for a decode batch on a GPU
    (kernels/triton_router_gemv.py); counters_T: that launch's per-token counters, unused here."""
    logits_TG = torch.nn.functional.linear(x_TD.to(gate_GD.dtype), gate_GD, gate_bias_G)
    weights_TK, ids_TK = reference_route_topk(logits_TG, top_k, method, renormalize, scale, n_group, topk_group,
                                              bias_G, valid_T, counts_G)
    return weights_TK, ids_TK, logits_TG


def _greedy(logits_TG, top_k, renormalize, scale):
    probs_TG = torch.softmax(_f32(logits_TG), dim=-1)
    weights_TK, ids_TK = torch.topk(probs_TG, top_k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    if scale != 1.0:
        weights_TK = weights_TK * scale
    return weights_TK, ids_TK


def _softmax_grouped(logits_TG, top_k, renormalize, scale, n_group, topk_group):
    scores_TG = torch.softmax(_f32(logits_TG), dim=-1)
    T, G = scores_TG.shape
    group_TP = scores_TG.view(T, n_group, G // n_group).amax(dim=-1)
    keep_TG = _group_mask(group_TP, topk_group, G)
    if keep_TG is not None:
        scores_TG = scores_TG.masked_fill(~keep_TG, 0.0)
    weights_TK, ids_TK = torch.topk(scores_TG, top_k, dim=-1, sorted=False)
    if renormalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK * scale, ids_TK


def _sigmoid_grouped(logits_TG, top_k, renormalize, scale, n_group, topk_group, bias_G):
    return _select_biased(torch.sigmoid(logits_TG.float()), top_k, renormalize, scale, n_group, topk_group, bias_G)


def _select_biased(scores_TG, top_k, renormalize, scale, n_group, topk_group, bias_G):
    """noaux_tc's selection on any scores: on scores + bias_G, groups ranked by the sum of their top-2 biased scores
    (when topk_group < n_group), experts outside the chosen groups at -inf; the weights the unbiased scores of the
    chosen experts, optionally renormalised (w / (sum + 1e-20)), then scaled."""
    choice_TG = scores_TG + bias_G if bias_G is not None else scores_TG
    T, G = choice_TG.shape
    keep_TG = None
    if topk_group < n_group:  # otherwise every group is kept: skip the group ranking
        group_TP = choice_TG.view(T, n_group, G // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        keep_TG = _group_mask(group_TP, topk_group, G)
    if keep_TG is not None:
        choice_TG = choice_TG.masked_fill(~keep_TG, float("-inf"))
    ids_TK = torch.topk(choice_TG, top_k, dim=-1, sorted=False)[1]
    weights_TK = scores_TG.gather(1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK * scale, ids_TK


def _sqrtsoftplus(logits_TG, top_k, renormalize, scale, bias_G):
    scores_TG = torch.sqrt(torch.nn.functional.softplus(logits_TG.to(torch.promote_types(logits_TG.dtype,
                                                                                          torch.float32))))
    choice_TG = scores_TG + bias_G if bias_G is not None else scores_TG
    ids_TK = torch.topk(choice_TG, top_k, dim=-1, sorted=False)[1]
    weights_TK = scores_TG.gather(1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK * scale, ids_TK


def reference_softmax_biased_topk(logits_TG: torch.Tensor, top_k: int, bias_G: torch.Tensor | None,
                                  renormalize: bool = False, scale: float = 1.0, n_group: int = 1,
                                  topk_group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """LongCat-Flash's router, op for op as transformers': softmax scores over all experts in float32, then noaux_tc's
    selection on scores + bias_G (`_select_biased`). (weights_TK float32, ids_TK int64). No fused form yet: the layer
    calls it (moe/router.py SoftmaxBiasedRouter)."""
    return _select_biased(torch.softmax(_f32(logits_TG), dim=-1), top_k, renormalize, scale, n_group, topk_group,
                          bias_G)


def _group_mask(group_TP: torch.Tensor, topk_group: int, num_experts: int) -> torch.Tensor | None:
    """bool [T, G]: experts of the `topk_group` best groups; None when every group is kept."""
    T, P = group_TP.shape
    if topk_group == P:
        return None
    group_idx_TK = torch.topk(group_TP, k=topk_group, dim=-1, sorted=False)[1]
    keep_TP = torch.zeros_like(group_TP, dtype=torch.bool).scatter_(1, group_idx_TK, True)
    return keep_TP.unsqueeze(-1).expand(T, P, num_experts // P).reshape(T, num_experts)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 (itself when it is: a same-dtype cast is still an op to dispatch)."""
    return x if x.dtype == torch.float32 else x.float()
