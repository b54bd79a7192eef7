"""Multi-head latent attention as a layer kind (mla.py beside it is its module; the KV cache layout it owns is told
in gqa_config.py's docstring), with DeepSeek Sparse Attention's indexer (dsa_config.py); pure data, no model code."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config.refusals import unsupported
from .dsa_config import IndexerConfig
from .rope_config import RopeConfig


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (kernels/mla.py has the algebra). q_lora_rank None: q comes from one q_proj
    (DeepSeek-V2-Lite); else q_a_proj → q_a_layernorm → q_b_proj. softmax_scale is transformers':
    (qk_nope_head_dim + qk_rope_head_dim)^-0.5, times yarn's mscale(factor, mscale_all_dim)^2."""

    kind: ClassVar[str] = "mla"
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: RopeConfig
    softmax_scale: float
    attention_bias: bool = False  # biases on q_a_proj, kv_a_proj_with_mqa and o_proj (transformers' attention_bias)
    # DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): the layer's lightning indexer (engine/models/dsa_config.py),
    # whose key cache is a second tensor beside the latent; None: dense MLA.
    indexer: IndexerConfig | None = None
    # Multipliers on q (after q_b_proj) and on the latent (after kv_a_layernorm): LongCat-Flash's mla_scale_q_lora /
    # mla_scale_kv_lora; folded into those two weights at load (engine/models/mla.py), so no step pays for them.
    q_scale: float = 1.0
    latent_scale: float = 1.0
    # False: no rotary at all ("NoPE", Kimi Linear's MLA layers): q_pe and k_pe pass as they are, the rope part of
    # the cache still written (the fused op rotates them by position 0's angle, the identity).
    rotary: bool = True
    # A sigmoid gate per head on the attention output, from the layer's input (Ling's hybrid: g_proj [H, D]).
    output_gate: bool = False
    # False: the checkpoint has no rope part at all (GLM-5.3-Flash: qk_rope_head_dim 0 in config.json, q heads of
    # qk_nope_head_dim, kv_a_proj_with_mqa of kv_lora_rank rows). The layer still holds a rope part of
    # qk_rope_head_dim dims (the family's reader picks the width), zero in q and k (engine/models/mla.py), so
    # q_pe . k_pe = 0 and every MLA kernel sees the layout it always does; rotary must be False.
    rope_in_checkpoint: bool = True
    # The gate per value instead (Hunyuan Hy4's element-wise gate: [N * v_head_dim, D], one per output value).
    output_gate_values: bool = False
    # A learned sink logit per head (Hunyuan Hy4): softmax over [scores, sink], the sink's share dropped, so a query
    # may attend to nothing; the kernels add exp(sink - max) to the denominator (kernels/mla.py).
    sinks: bool = False

    def __post_init__(self) -> None:
        for name in ("q_scale", "latent_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"MLAConfig {name}={v!r} is invalid: must be a finite number > 0.")
        if self.q_scale != 1.0 and self.q_lora_rank is None:
            raise ValueError("MLAConfig q_scale scales q_b_proj's output: it needs a q_lora_rank.")
        for name in ("output_gate", "output_gate_values", "sinks"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MLAConfig {name}={getattr(self, name)!r} is invalid: must be True or False.")
        if self.output_gate_values and not self.output_gate:
            raise ValueError("MLAConfig output_gate_values=True is invalid without output_gate=True (it says how wide "
                             "the gate is).")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"config.json {name}={v!r} is invalid: must be a positive integer.")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            raise ValueError(f"config.json q_lora_rank={self.q_lora_rank!r} is invalid: must be null or a positive integer.")
        if self.rope.rotary_dim != self.qk_rope_head_dim:
            raise ValueError(f"MLAConfig rope.rotary_dim={self.rope.rotary_dim} must equal qk_rope_head_dim="
                             f"{self.qk_rope_head_dim}.")
        if not self.rope_in_checkpoint and self.rotary:
            raise ValueError("MLAConfig rope_in_checkpoint=False holds a zero rope part: rotary must be False.")
        if self.indexer is not None and self.indexer.rope_dim and self.indexer.rope_dim != self.qk_rope_head_dim:
            raise ValueError(f"MLAConfig indexer.rope_dim={self.indexer.rope_dim} must equal qk_rope_head_dim="
                             f"{self.qk_rope_head_dim} (the indexer uses the layer's rope table).")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def kv_layer_pairs(self, num_layers: int) -> None:
        """MLA has no sliding layers: every layer has its own cache tensors (see GQAConfig.kv_layer_pairs)."""
        return None

    def kv_values_per_token(self) -> int:
        """Values one token stores in one layer's latent cache: its latent and its roped key, shared by every head
        (DSA's indexer key, in a layout of its own, is counted in bytes: kv_bytes_per_token)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def _own_keys(self) -> bool:
        return self.indexer is not None and not self.indexer.shared

    def cache_shapes(self, num_blocks: int, block_size: int,
                     cache_dtype: torch.dtype | None = None) -> tuple[tuple[int, ...], ...]:
        """One layer's cache tensors, the null block included: (latent_cache_BLR,), and under DSA with an indexer
        of its own (latent_cache_BLR, index_cache_BLX) on the same block ids, X the key row (head_dim values, or an
        fp8 row's bytes: engine/models/dsa_config.py). `cache_dtype` (the latent's) decides an unresolved
        indexer's layout (IndexerConfig.key_dtype None)."""
        latent = (num_blocks + 1, block_size, self.kv_lora_rank + self.qk_rope_head_dim)
        if not self._own_keys():
            return (latent,)
        return latent, (num_blocks + 1, block_size, self.indexer.key_row(cache_dtype or torch.float32))

    def cache_dtypes(self, cache_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        """The element types of cache_shapes' tensors: the latent in the cache's dtype, the indexer keys in theirs
        (uint8 rows for fp8 keys with scales)."""
        if not self._own_keys():
            return (cache_dtype,)
        return cache_dtype, self.indexer.key_cache_dtype(cache_dtype)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        index = self.indexer.key_bytes_per_token(dtype) if self.indexer is not None else 0
        return self.kv_values_per_token() * dtype.itemsize + index


__all__ = ["MLAConfig"]
