"""Expert computation references: align tokens by expert, then grouped SiLU-gated MLPs.

Legend: T tokens, K experts per token (top-k), E local experts, D hidden,
I expert intermediate size, F = 2I (gate and up stacked), P = T*K pairs.

Weights are stacked per layer at load time: w13_EFD holds [gate; up] rows of
each expert, w2_EDI its down projection. `expert_map_G` (optional, int32 over
all G global experts) maps a global expert id to its local index, or -1 when
the expert lives on another rank: such pairs contribute nothing here.
"""
from __future__ import annotations

import contextvars
import itertools

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MoEActivation:
    """The gated activation between the two expert GEMMs, applied to the [gate | up] halves of x @ w13^T.

    - "silu" (Qwen3, Mixtral, DeepSeek, GLM): silu(gate) * up.
    - "swiglu_oai" (gpt-oss): gate' = min(gate, limit), up' = clamp(up, -limit, limit),
      (up' + 1) * gate' * sigmoid(alpha * gate'), with the checkpoint's swiglu_alpha (1.702) and
      swiglu_limit (7.0). gpt-oss stores gate and up interleaved; the loader de-interleaves them into the
      [gate; up] rows of w13 so every kernel sees one layout.
    - "silu_clamp" (DeepSeek-V4): silu(min(gate, limit)) * clamp(up, -limit, limit), its swiglu_limit (10.0).
    - "relu2" (Nemotron-H's ungated experts, transformers' ACT2FN["relu2"]): relu(up)^2; the gate half is not read
      (the family loads its up_proj into the up rows and leaves the gate rows zero). The plain-torch references,
      cpu_native's fallback to them and the Triton epilogue (ACT 3) run it.
    """

    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self):
        if self.kind not in ("silu", "swiglu_oai", "silu_clamp", "relu2"):
            raise ValueError(f"activation={self.kind!r} is invalid: 'silu', 'swiglu_oai', 'silu_clamp' or 'relu2'.")
        if self.kind not in ("silu", "relu2") and not (self.limit > 0 and self.alpha > 0):
            raise ValueError(f"swiglu_limit={self.limit} / swiglu_alpha={self.alpha} are invalid: both must be > 0.")

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.kind == "silu":
            return F.silu(gate) * up
        if self.kind == "relu2":
            return F.relu(up).square()
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        if self.kind == "silu_clamp":
            return F.silu(gate) * up
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


SILU = MoEActivation()


# Few tokens (decode): one padded batched matmul over all experts beats a loop of
# tiny matmuls, as long as padding at most doubles the work.
_PADDED_MAX_PAIRS = 256


# The padded path's limit for this thread: batch-invariant mode (kernels/batch_invariant.py) sets 0 while a step runs,
# so every caller of reference_fused_moe (the float experts, and the INT4 / MXFP4 / NVFP4 references, which
# dequantize and call it) keeps one path whatever the batch.
PADDED_MAX_PAIRS: contextvars.ContextVar[int] = contextvars.ContextVar("padded_max_pairs", default=_PADDED_MAX_PAIRS)


def reference_fused_moe(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDI: torch.Tensor, topk_weights_TK: torch.Tensor,
                        topk_ids_TK: torch.Tensor, expert_map_G: torch.Tensor | None = None, *,
                        b13_EF: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
                        activation: MoEActivation = SILU) -> torch.Tensor:
    return fused_moe_torch(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK, expert_map_G, b13_EF=b13_EF,
                           b2_ED=b2_ED, activation=activation, padded_max_pairs=PADDED_MAX_PAIRS.get())


def fused_moe_torch(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDI: torch.Tensor, topk_weights_TK: torch.Tensor,
                    topk_ids_TK: torch.Tensor, expert_map_G: torch.Tensor | None = None, *,
                    b13_EF: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
                    activation: MoEActivation = SILU, padded_max_pairs: int = _PADDED_MAX_PAIRS) -> torch.Tensor:
    """out[t] = Σ_k w[t,k] · (down_e(act(gate_e(x[t]), up_e(x[t]))) + b2_e) over the local experts e = ids[t,k],
    with gate_e / up_e including b13_e's halves when given (gpt-oss's expert biases; the routed weight scales
    the down bias too, as transformers applies it).

    One matmul per expert that has tokens (tokens gathered by index, no
    padding). Returns [T, D] in x's dtype; rows whose experts are all remote are 0.
    Up to `padded_max_pairs` (token, expert) pairs, two batched matmuls over a padded buffer instead when padding at
    most doubles the work (0: never; batch-invariant mode, kernels/batch_invariant.py, keeps one path whatever the
    batch, since the two paths round differently).
    """
    top_k = topk_ids_TK.shape[1]
    num_local = w13_EFD.shape[0]
    num_pairs = topk_ids_TK.numel()
    if expert_map_G is None and 0 < num_pairs <= min(GATHERED_MAX_PAIRS, num_local, padded_max_pairs):
        return _gathered_experts(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK, b13_EF, b2_ED, activation)
    out_TD = torch.zeros_like(x_TD)
    sort_key_P, order_P, counts_E = sort_pairs(topk_ids_TK, num_local, expert_map_G)
    counts = counts_E.tolist()  # host sync: per-expert token counts drive the loop
    weights_P = topk_weights_TK.reshape(-1)
    num_pairs = int(sort_key_P.numel())
    max_count = max(counts, default=0)
    if 0 < num_pairs <= padded_max_pairs and num_local * max_count <= 2 * num_pairs:
        return _padded_bmm(x_TD, w13_EFD, w2_EDI, weights_P, sort_key_P, order_P, counts_E, max_count, top_k, out_TD,
                           b13_EF, b2_ED, activation)
    return _segmented_experts(x_TD, w13_EFD, w2_EDI, weights_P, order_P, counts, top_k, out_TD, b13_EF, b2_ED,
                              activation)


def _segmented_experts(x_TD, w13_EFD, w2_EDI, weights_P, order_P, counts: list[int], top_k: int, out_TD,
                       b13_EF=None, b2_ED=None, activation: MoEActivation = SILU) -> torch.Tensor:
    """One matmul pair per expert with tokens, over contiguous segments of the pairs sorted by expert: the tokens
    gathered once, each expert's GEMMs on its rows, the activation, the routing weights and the
    scatter-add once over all pairs. The values of a loop of per-expert gather / linear / index_add (each row's
    GEMM over the same inputs, a token's pairs added in expert order) in about 10 + 2E torch ops where the loop
    takes 9E: the mid-size decode batches of a CPU step are op dispatch."""
    n_valid = sum(counts)  # remote pairs (another rank's experts) sort last: left out
    if n_valid == 0:  # no token here (T = 0, or every pair another rank's)
        return out_TD
    pairs_n = order_P[:n_valid]
    tok_n = pairs_n // top_k
    x_nD = x_TD.index_select(0, tok_n)
    segments = [(e, start, n) for e, start, n in zip(range(len(counts)), itertools.accumulate(counts, initial=0), counts)
                if n]
    if n_valid > STREAMED_MIN_PAIRS and out_TD.dtype in (torch.float32, torch.float64):
        return _streamed_segments(x_nD, tok_n, w13_EFD, w2_EDI, weights_P.index_select(0, pairs_n), segments, out_TD,
                                  b13_EF, b2_ED, activation)
    # F.linear per segment, as the loop calls it (the same BLAS call, and what a batch-invariant mode's function
    # override sees), joined by one cat.
    h_nF = torch.cat([F.linear(x_nD[o: o + n], w13_EFD[e], None if b13_EF is None else b13_EF[e])
                      for e, o, n in segments])
    gate_nI, up_nI = h_nF.chunk(2, dim=-1)
    a_nI = activation(gate_nI, up_nI)
    y_nD = torch.cat([F.linear(a_nI[o: o + n], w2_EDI[e], None if b2_ED is None else b2_ED[e])
                      for e, o, n in segments])
    y_nD = y_nD * _cast(weights_P.index_select(0, pairs_n)[:, None], y_nD.dtype)
    out_TD.index_add_(0, tok_n, _cast(y_nD, out_TD.dtype))
    return out_TD


# From this many pairs (a prompt chunk's) each expert's segment runs its GEMMs, activation, weighting and scatter-add
# on its own rows: temporaries one segment large instead of the whole step's joined by two cats (8,192 tokens: the
# cats alone were ~3 ms of a ~25 ms layer). Below it the joined form's fewer torch ops win (a decode batch). float32
# and float64 only: there one index_add_ over all pairs adds a token's rows in order as the per-segment ones do (the
# same values, checked); a bfloat16 one rounds its repeated rows differently (one ulp at a token's sum).
STREAMED_MIN_PAIRS = 1024


def _streamed_segments(x_nD, tok_n, w13_EFD, w2_EDI, weights_n, segments, out_TD, b13_EF=None, b2_ED=None,
                       activation: MoEActivation = SILU) -> torch.Tensor:
    """_segmented_experts one segment at a time: the same F.linear calls on the same rows, the same elementwise
    ops, and each segment's rows added in expert order as the joined index_add adds them: the same values."""
    for e, o, n in segments:
        h_sF = F.linear(x_nD[o: o + n], w13_EFD[e], None if b13_EF is None else b13_EF[e])
        gate_sI, up_sI = h_sF.chunk(2, dim=-1)
        y_sD = F.linear(activation(gate_sI, up_sI), w2_EDI[e], None if b2_ED is None else b2_ED[e])
        y_sD = y_sD * _cast(weights_n[o: o + n, None], y_sD.dtype)
        out_TD.index_add_(0, tok_n[o: o + n], _cast(y_sD, out_TD.dtype))
    return out_TD


# A batch of at most this many (token, expert) pairs (batch 1 to 4 at top-2) gathers its experts' weights
# (_gathered_experts); never more pairs than local experts, so it copies at most the layer's weights once.
GATHERED_MAX_PAIRS = 8


def _gathered_experts(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK, b13_EF=None, b2_ED=None,
                      activation: MoEActivation = SILU) -> torch.Tensor:
    """A few pairs (a small decode batch): each pair's expert weights gathered ([P, F, D], [P, D, I]) and two
    batched matmuls, about ten torch ops where sorting the pairs and one matmul pair per expert take forty: on a
    CPU a batch-1 MoE layer is op dispatch. Ids are local (no expert map); a pair with none (-1) adds nothing."""
    T, K = topk_ids_TK.shape
    ids_P = topk_ids_TK.reshape(-1).long()
    none_TK1 = (topk_ids_TK < 0)[:, :, None]
    ids_P = ids_P.clamp(min=0)
    x_P1D = x_TD.unsqueeze(1).expand(T, K, x_TD.shape[1]).reshape(T * K, 1, x_TD.shape[1])
    h_P1F = torch.bmm(x_P1D, w13_EFD.index_select(0, ids_P).transpose(1, 2))
    if b13_EF is not None:
        h_P1F = h_P1F + b13_EF.index_select(0, ids_P)[:, None, :]
    gate_P1I, up_P1I = h_P1F.chunk(2, dim=-1)
    y_P1D = torch.bmm(activation(gate_P1I, up_P1I), w2_EDI.index_select(0, ids_P).transpose(1, 2))
    if b2_ED is not None:
        y_P1D = y_P1D + b2_ED.index_select(0, ids_P)[:, None, :]
    y_TKD = y_P1D.view(T, K, -1) * _cast(topk_weights_TK[:, :, None], y_P1D.dtype)
    return _cast(y_TKD.masked_fill(none_TK1, 0).sum(1), x_TD.dtype)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as `dtype` (itself when it is: a same-dtype cast is still an op to dispatch on a CPU step)."""
    return x if x.dtype == dtype else x.to(dtype)


def sort_pairs(topk_ids_TK: torch.Tensor, num_local: int, expert_map_G: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, k) pairs grouped by local expert: (sort_key_P: each pair's local expert, num_local where it has
    none here; order_P: the pairs in expert order, a token's pairs in k order within one expert (stable); counts_E:
    pairs per local expert). `expert_map_G` maps global ids to local ones (-1: another rank's); no host sync."""
    ids_P = topk_ids_TK.reshape(-1).long()
    if expert_map_G is not None:  # -1 (no expert) stays -1: indexing the map with it would wrap
        ids_P = torch.where(ids_P >= 0, expert_map_G.long()[ids_P.clamp(min=0)], torch.full_like(ids_P, -1))
    sort_key_P = torch.where(ids_P >= 0, ids_P, torch.full_like(ids_P, num_local))
    order_P = torch.argsort(sort_key_P, stable=True)
    return sort_key_P, order_P, torch.bincount(sort_key_P, minlength=num_local + 1)[:num_local]


def per_expert(order_P: torch.Tensor, counts: list[int], top_k: int):
    """(expert, its pairs_n, their tokens tok_n) for each local expert with pairs, in expert order: the loop of the
    per-expert path (here, and the LoRA experts' in engine/lora/experts.py)."""
    offset = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs_n = order_P[offset: offset + n]
        offset += n
        yield e, pairs_n, pairs_n // top_k


def _padded_bmm(x_TD, w13_EFD, w2_EDI, weights_P, sort_key_P, order_P, counts_E, max_count, top_k, out_TD,
                b13_EF=None, b2_ED=None, activation: MoEActivation = SILU):
    """Tokens of each expert in rows of an [E, max_count, D] buffer, two batched matmuls, scatter back."""
    num_local = w13_EFD.shape[0]
    n_valid = int(counts_E.sum())
    pairs_n = order_P[:n_valid]  # sorted by expert; remote pairs (key = num_local) sort last
    expert_n = sort_key_P.index_select(0, pairs_n)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    row_n = torch.arange(n_valid, device=x_TD.device) - starts_E.index_select(0, expert_n)
    tok_n = pairs_n // top_k
    buf_EnD = x_TD.new_zeros(num_local, max_count, x_TD.shape[1])
    buf_EnD[expert_n, row_n] = x_TD.index_select(0, tok_n)
    h_EnF = torch.bmm(buf_EnD, w13_EFD.transpose(1, 2))
    if b13_EF is not None:  # padding rows pick up the bias too; they are never read back
        h_EnF = h_EnF + b13_EF[:, None, :]
    gate_EnI, up_EnI = h_EnF.chunk(2, dim=-1)
    y_EnD = torch.bmm(activation(gate_EnI, up_EnI), w2_EDI.transpose(1, 2))
    if b2_ED is not None:
        y_EnD = y_EnD + b2_ED[:, None, :]
    y_nD = y_EnD[expert_n, row_n] * weights_P.index_select(0, pairs_n)[:, None].to(y_EnD.dtype)
    out_TD.index_add_(0, tok_n, y_nD.to(out_TD.dtype))
    return out_TD
