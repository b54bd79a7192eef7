"""DeepSeek Sparse Attention (DSA: DeepSeek-V3.2, GLM-5) as config: the lightning indexer an MLA layer runs beside its
attention, and what the indexer caches per token. Pure data (mla_config.MLAConfig holds one).

What it computes (transformers' DeepseekV32Indexer without a cache is the definition): per query token t and head h
of the indexer, q[t, h] = rope(wq_b(q_resid[t]))[h] (q_resid = q_a_layernorm(q_a_proj(x)), MLA's own q latent), one
key per token k[j] = rope(LayerNorm(wk(x[j]))), and a weight per head w[t, h] = weights_proj(x[t])[h] / sqrt(H);
    index_score[t, j] = sum_h w[t, h] * relu(q[t, h] . k[j] / sqrt(D))        for j <= t (causal predecessors)
and attention reads only the `topk` positions of highest score (all of them while t + 1 <= topk). The rope covers
the first `rope_dim` (= qk_rope_head_dim) dims of each q head and of the key, with MLA's table: half-split pairs
(DeepSeek-V3.2, "neox") or interleaved pairs (GLM-5; de-interleaved at load, then run as neox). Hunyuan Hy4 rotates
the last `rope_dim` dims instead (`rope_position` "last"): its rows are moved to the front at load (wq_b's per head,
wk's and k_norm's), which changes no score (q and k permuted alike; a LayerNorm commutes with a permutation).

GLM-5.3-Flash's pooled selection (`kpool` > 1, transformers' Glm5NextTextIndexer): no rope (rope_dim 0), and the
keys scored are pools of `kpool` consecutive tokens, each pool's key the softmax-weighted mean of its tokens' keys,
per channel, with weights gate[j] + ape[j mod kpool] (gate[j] = index_kpool_compress_gate @ x[j], ape a learned
[kpool, head_dim] table); a query scores only the complete pools it sees whole, selects the `topk / kpool` best, and
attends to their tokens plus the tokens of its own incomplete pool (index_kpool_always_select_tail). The key cache's
row is then [key | gate] (2 head_dim values, float only).

GLM-5's cross-layer sharing: a "shared" layer has no indexer of its own and attends to the positions the previous
"full" layer selected (config.json indexer_types / index_topk_pattern).

The key cache: one row per token beside MLA's latent row, in the same blocks (so the scheduler's block accounting,
prefix caching and PD transfers cover it), in one of two layouts (`IndexerConfig.key_dtype`, resolved from
--index-cache-dtype by `resolve_index_cache`):
- fp8 (DeepSeek's own inference code and vLLM for V3.2; the default under --kv-cache-dtype fp8): the key in e4m3, one
  float32 scale per INDEX_SCALE_GROUP (128) values along head_dim (amax / 448: every group uses e4m3's whole range),
  stored as bytes [key (head_dim bytes, padded to 4) | scales (4 bytes each)]: 132 bytes for a 128-value key, where
  a bf16 key takes 256;
- float: the key's head_dim values in a float dtype (the model's: the default without an fp8 KV cache).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

INDEXER_ROPE_STYLES = ("neox", "interleaved")
# Which end of each index head the rope covers: "first" (DeepSeek-V3.2, GLM-5) or "last" (Hunyuan Hy4).
INDEXER_ROPE_POSITIONS = ("first", "last")
# --index-cache-dtype: "auto" = fp8 when the KV cache is fp8, else the model's dtype; "fp8" = always the fp8 layout;
# "model" = the model's dtype whatever the KV cache holds.
INDEX_CACHE_DTYPES = ("auto", "fp8", "model")
# Values per float32 scale of an fp8 key (DeepSeek-V3.2's quant block along index_head_dim).
INDEX_SCALE_GROUP = 128
INDEX_FP8_DTYPE = torch.float8_e4m3fn


def index_scale_groups(head_dim: int) -> int:
    """Scales per fp8 key: one per INDEX_SCALE_GROUP values, the last group possibly shorter."""
    return -(-head_dim // INDEX_SCALE_GROUP)


def index_fp8_row_bytes(head_dim: int) -> int:
    """Bytes of one token's fp8 key row: the e4m3 key padded to 4 bytes (so the scales are float32-aligned), then its
    float32 scales."""
    return -(-head_dim // 4) * 4 + 4 * index_scale_groups(head_dim)


@dataclass(frozen=True)
class IndexerConfig:
    """One MLA layer's lightning indexer (module docstring)."""

    num_heads: int  # index_n_heads
    head_dim: int  # index_head_dim
    topk: int  # index_topk: positions each query attends to once its context is longer
    rope_dim: int  # qk_rope_head_dim: the rotated prefix of each index head and of the key
    rope_style: str = "neox"  # "neox" (DeepSeek-V3.2's half split) or "interleaved" (GLM-5)
    rope_position: str = "first"  # INDEXER_ROPE_POSITIONS: the rotated dims are each head's first or last rope_dim
    # The key's LayerNorm eps: transformers' nn.LayerNorm default 1e-6 (DeepSeek-V3.2, GLM-5); Hy4 passes rms_norm_eps.
    k_norm_eps: float = 1e-6
    shared: bool = False  # GLM-5 "shared": reuse the previous full layer's positions (no weights, no key cache)
    # The key cache's layout (module docstring): INDEX_FP8_DTYPE for fp8 keys with per-128 scales, a float dtype for
    # float keys, None for the latent cache's dtype (what ModelConfig resolves away: resolve_index_cache).
    key_dtype: torch.dtype | None = None
    # GLM-5.3-Flash's pooled selection (module docstring): index_kpool tokens per pool; 1 = a score per token.
    kpool: int = 1

    def __post_init__(self) -> None:
        for name, field_name in (("num_heads", "index_n_heads"), ("head_dim", "index_head_dim"), ("topk", "index_topk")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"config.json {field_name}={v!r} is invalid: must be a positive integer.")
        if self.rope_style not in INDEXER_ROPE_STYLES:
            raise ValueError(f"IndexerConfig rope_style={self.rope_style!r} is invalid: allowed: "
                             f"{', '.join(INDEXER_ROPE_STYLES)}.")
        if isinstance(self.kpool, bool) or not isinstance(self.kpool, int) or self.kpool < 1 or self.topk % self.kpool:
            raise ValueError(f"config.json index_kpool={self.kpool!r} is invalid: must be a positive integer dividing "
                             f"index_topk={self.topk}.")
        if self.kpool > 1 and self.rope_dim:
            raise ValueError(f"IndexerConfig rope_dim={self.rope_dim} is invalid with index_kpool={self.kpool}: the "
                             "pooled indexer has no rope (0).")
        if self.rope_position not in INDEXER_ROPE_POSITIONS:
            raise ValueError(f"IndexerConfig rope_position={self.rope_position!r} is invalid: allowed: "
                             f"{', '.join(INDEXER_ROPE_POSITIONS)}.")
        if isinstance(self.k_norm_eps, bool) or not isinstance(self.k_norm_eps, (int, float)) or not self.k_norm_eps > 0:
            raise ValueError(f"IndexerConfig k_norm_eps={self.k_norm_eps!r} is invalid: must be a number > 0.")
        if self.kpool == 1 and (not 2 <= self.rope_dim <= self.head_dim or self.rope_dim % 2):
            raise ValueError(f"config.json qk_rope_head_dim={self.rope_dim} is invalid for the indexer: must be even and "
                             f"at most index_head_dim={self.head_dim} (the indexer rotates that prefix of each head).")

        if self.pooled and self.key_dtype == INDEX_FP8_DTYPE:
            raise ValueError(f"index_cache_dtype='fp8' is not supported with index_kpool={self.kpool}: the pooled "
                             "indexer's cache rows (key and gate) are kept in the model's dtype; use 'model' or 'auto'.")
        if self.key_dtype is not None and not (self.key_dtype == INDEX_FP8_DTYPE or self.key_dtype.is_floating_point
                                               and self.key_dtype.itemsize > 1):
            raise ValueError(f"IndexerConfig key_dtype={self.key_dtype} is invalid: allowed: None, {INDEX_FP8_DTYPE} "
                             "(fp8 keys with per-128 scales) or a float dtype of 2 bytes or more.")

    @property
    def pooled(self) -> bool:
        """GLM-5.3-Flash's pooled selection (module docstring)."""
        return self.kpool > 1

    @property
    def width(self) -> int:
        """Positions one query attends to at most: topk, plus its incomplete pool's kpool - 1 tokens when pooled."""
        return self.topk + self.kpool - 1

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5

    def fp8_keys(self, cache_dtype: torch.dtype) -> bool:
        """Whether the key cache holds fp8 keys with scales beside a latent cache of `cache_dtype`."""
        return (self.key_dtype or cache_dtype) == INDEX_FP8_DTYPE

    def key_cache_dtype(self, cache_dtype: torch.dtype) -> torch.dtype:
        """The key cache tensor's element type: uint8 for fp8 rows (keys and scales as bytes), else the float dtype."""
        return torch.uint8 if self.fp8_keys(cache_dtype) else (self.key_dtype or cache_dtype)

    def key_row(self, cache_dtype: torch.dtype) -> int:
        """Elements of one token's key row (its cache tensor's last dim)."""
        if self.pooled:  # [key | gate], float
            return 2 * self.head_dim
        return index_fp8_row_bytes(self.head_dim) if self.fp8_keys(cache_dtype) else self.head_dim

    def key_bytes_per_token(self, cache_dtype: torch.dtype) -> int:
        """Bytes the layer's key cache holds per token: its key row, or none for a shared layer."""
        if self.shared:
            return 0
        return self.key_row(cache_dtype) * self.key_cache_dtype(cache_dtype).itemsize


def resolve_index_cache(attention, layer_attention: tuple, dtype: torch.dtype, cache_dtype: torch.dtype,
                        choice: str) -> tuple:
    """(attention, layer_attention) with every indexer's key_dtype set from --index-cache-dtype `choice`
    (INDEX_CACHE_DTYPES) and the model / KV cache dtypes; configs without an indexer returned as they are."""
    if choice not in INDEX_CACHE_DTYPES:
        raise ValueError(f"index_cache_dtype={choice!r} is invalid: choose from "
                         f"{', '.join(map(repr, INDEX_CACHE_DTYPES))}.")
    fp8 = choice == "fp8" or (choice == "auto" and cache_dtype == INDEX_FP8_DTYPE)

    def one(att):
        ix = getattr(att, "indexer", None)
        if not isinstance(ix, IndexerConfig):  # no DSA indexer (another kind's field of that name is not this one)
            return att
        # "auto" keeps a pooled indexer's rows float beside an fp8 latent (it has no fp8 layout); "fp8" is refused.
        key_dtype = INDEX_FP8_DTYPE if fp8 and (choice == "fp8" or not ix.pooled) else dtype
        return dataclasses.replace(att, indexer=dataclasses.replace(ix, key_dtype=key_dtype))

    return one(attention), tuple(one(a) for a in layer_attention)
