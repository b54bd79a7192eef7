"""DeepSeek Sparse Attention (DSA: DeepSeek-V3.2, GLM-5) as config: the lightning indexer an MLA layer runs beside its
attention, and what the indexer caches per token. Pure data (engine/config/layer_configs.MLAConfig holds one).

What it computes (transformers' DeepseekV32Indexer without a cache is the definition): per query token t and head h
of the indexer, q[t, h] = rope(wq_b(q_resid[t]))[h] (q_resid = q_a_layernorm(q_a_proj(x)), MLA's own q latent), one
key per token k[j] = rope(LayerNorm(wk(x[j]))), and a weight per head w[t, h] = weights_proj(x[t])[h] / sqrt(H);
    index_score[t, j] = sum_h w[t, h] * relu(q[t, h] . k[j] / sqrt(D))        for j <= t (causal predecessors)
and attention reads only the `topk` positions of highest score (all of them while t + 1 <= topk). The rope covers
the first `rope_dim` (= qk_rope_head_dim) dims of each q head and of the key, with MLA's table: half-split pairs
(DeepSeek-V3.2, "neox") or interleaved pairs (GLM-5; de-interleaved at load, then run as neox).

GLM-5's cross-layer sharing: a "shared" layer has no indexer of its own and attends to the positions the previous
"full" layer selected (config.json indexer_types / index_topk_pattern).

The key cache: one row of `head_dim` values per token beside MLA's latent row, in the same blocks (so the scheduler's
block accounting, prefix caching and PD transfers cover it), in the latent cache's dtype: the model dtype, or e4m3
with scale 1.0 under --kv-cache-dtype fp8 (the published models keep fp8 keys with a scale per 128 values; a
LayerNorm'd key sits well inside e4m3's range, so one scale loses only subnormal precision).
"""
from __future__ import annotations

from dataclasses import dataclass

INDEXER_ROPE_STYLES = ("neox", "interleaved")


@dataclass(frozen=True)
class IndexerConfig:
    """One MLA layer's lightning indexer (module docstring)."""

    num_heads: int  # index_n_heads
    head_dim: int  # index_head_dim
    topk: int  # index_topk: positions each query attends to once its context is longer
    rope_dim: int  # qk_rope_head_dim: the rotated prefix of each index head and of the key
    rope_style: str = "neox"  # "neox" (DeepSeek-V3.2's half split) or "interleaved" (GLM-5)
    shared: bool = False  # GLM-5 "shared": reuse the previous full layer's positions (no weights, no key cache)

    def __post_init__(self) -> None:
        for name, field_name in (("num_heads", "index_n_heads"), ("head_dim", "index_head_dim"), ("topk", "index_topk")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"config.json {field_name}={v!r} is invalid: must be a positive integer.")
        if self.rope_style not in INDEXER_ROPE_STYLES:
            raise ValueError(f"IndexerConfig rope_style={self.rope_style!r} is invalid: allowed: "
                             f"{', '.join(INDEXER_ROPE_STYLES)}.")
        if not 2 <= self.rope_dim <= self.head_dim or self.rope_dim % 2:
            raise ValueError(f"config.json qk_rope_head_dim={self.rope_dim} is invalid for the indexer: must be even and "
                             f"at most index_head_dim={self.head_dim} (the indexer rotates that prefix of each head).")

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5

    @property
    def key_values_per_token(self) -> int:
        """Values the layer's key cache holds per token: the key, or none for a shared layer."""
        return 0 if self.shared else self.head_dim
