"""Grouped-query attention as a layer kind (gqa.py beside it is its module), and the KV cache layout of each attention
kind: each kind's config sits beside its module (mla_config.py, dsa_config.py, gated_deltanet_config.py, ...), read
from config.json by the families' readers (engine/config/hf_readers.py); pure data, no model code, no device.

Attention kinds
(ARCHITECTURE.md: Design rules 11, model families as compositions; KV cache layouts per attention kind):
- GQAConfig: grouped-query attention (Qwen3-MoE, Mixtral, GLM-4-MoE, gpt-oss, MiniMax-M2, MiMo-V2-Flash). The cache
  holds a K and a V per kv head per token: two tensors [blocks + 1, block_size, K, H] and [..., K, Hv] per layer (Hv =
  v_head_dim, H unless the model says otherwise: MiMo-V2-Flash's 192 / 128). gpt-oss adds per-head attention sinks
  and a sliding window on every other layer. When its sliding and full layers are equally many (`kv_layer_pairs`), sliding
  layer j and full layer j share one set of cache tensors: a block id is handed to one group at a time (the
  scheduler keeps a second block table for the sliding group, whose blocks are freed once they leave the window),
  so a block costs half the layers' bytes.
- MLAConfig: multi-head latent attention (DeepSeek-V2/V3, Kimi K2). The cache holds one row per token, the
  normalised latent c_kv and the roped key k_pe: one tensor [blocks + 1, block_size, kv_lora_rank +
  qk_rope_head_dim] per layer (576 values for DeepSeek-V3 instead of 2 * 128 heads * 128). DeepSeek Sparse Attention
  (DeepSeek-V3.2, GLM-5) adds the lightning indexer's key cache, [blocks + 1, block_size, key row], on the same
  block ids: index_head_dim float values, or (fp8, the default beside an fp8 KV cache) the e4m3 key and its float32
  scales per 128 values as bytes (dsa_config.py).
Layers of one model may differ within their kind (MiMo-V2-Flash: its sliding layers have twice the kv heads, sinks
and a rope of their own): ModelConfig.layer_attention then holds each layer's config, and every per-layer question
(the layer's shapes, its cache, its rope) is asked of `ModelConfig.attention_for(layer)`.
The KV sizer and the runner's allocation ask the kind (`kv_bytes_per_token`, `cache_shapes`, `cache_dtypes`); nothing
else in the engine knows the layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config.refusals import unsupported
from .rope_config import RopeConfig

# GQA's q/k RMSNorm (GQAConfig.qk_norm): "per_head" normalises each head's H dims with one [H] weight shared by the
# heads (Qwen3-MoE, GLM's use_qk_norm); "all_heads" normalises a token's whole q (N * H dims) and k (K * H) before
# they are split into heads, with [N * H] / [K * H] weights (MiniMax-M2's qk_norm_type "per_layer"); "l2" normalises
# each head as "per_head" does with no weight (x * rsqrt(mean(x^2) + eps): Llama 4's Llama4TextL2Norm on its rope
# layers; held as a weight of ones that no checkpoint tensor fills).
QK_NORMS = ("per_head", "all_heads", "l2")


@dataclass(frozen=True)
class GQAConfig:
    """Grouped-query attention: N query heads share K kv heads of H dims; q/k/v stacked in one matmul."""

    kind: ClassVar[str] = "gqa"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig
    # RMSNorm of q and k before rotary: None, or a QK_NORMS mode ("per_head": Qwen3-MoE, GLM's use_qk_norm;
    # "all_heads": MiniMax-M2). True reads as "per_head", False as None.
    qk_norm: str | None = None
    # The "per_head" q/k norm runs after the rotary rather than before it (HunYuan-MoE-V1's query_layernorm /
    # key_layernorm: a weighted norm does not commute with the rotation, so the two orders differ).
    qk_norm_after_rope: bool = False
    qkv_bias: bool = False  # biases on q/k/v (GLM's attention_bias, gpt-oss's)
    o_bias: bool = False  # a bias on o_proj too (gpt-oss's attention_bias; GLM has none there)
    sinks: bool = False  # a learned logit per query head in every softmax's denominator, with no value (gpt-oss)
    # Layers whose queries see only the last `sliding_window` keys, themselves included (gpt-oss's
    # "sliding_attention" layer_types: transformers masks key positions <= query position - sliding_window).
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    # Layers whose q and k get no rotary at all ("NoPE"): EXAONE-MoE's full-attention layers between its sliding
    # ones (transformers: "global NoPE for hybrid attention"); position reaches them only through the sliding layers.
    nope_layers: tuple[int, ...] = ()
    # The width of a value head when it differs from q/k's head_dim (MiMo-V2-Flash: 128 vs 192); None: head_dim.
    # The V cache, the attention output and o_proj's input are this wide.
    v_head_dim: int | None = None
    # A constant every value is multiplied by before it is cached (MiMo-V2-Flash's attention_value_scale).
    value_scale: float = 1.0
    # A sigmoid gate on the attention output, one value per query head dim (Qwen3-Next, Qwen3.5: q_proj holds each
    # head's query rows then its gate rows; o = attention * sigmoid(gate) before o_proj).
    output_gate: bool = False
    # q, k and v clamped to [-clip_qkv, clip_qkv] after the projection (and an all-heads q/k norm), before rotary:
    # OLMoE's and DBRX's clip_qkv, a training-stability clamp their transformers models apply at inference too.
    clip_qkv: float | None = None
    # The softmax scale when it is not head_dim ** -0.5 (Granite-MoE's muP attention_multiplier); None: that.
    scale: float | None = None
    # Chunked local attention (Llama 4's attention_chunk_size on its rope layers): the query at position p sees the
    # keys of its own chunk only, [floor(p / C) * C, p] (transformers' chunked_overlay: a block-diagonal causal mask
    # by absolute position). Run over the paged cache as one virtual sequence per chunk (kernels/attention_chunks.py),
    # so every attention kernel runs it unchanged; the block size must divide C (cache_shapes). None: causal over the
    # whole context.
    attention_chunk_size: int | None = None
    # Attention temperature tuning (Llama 4's attn_temperature_tuning on its NoPE layers, arXiv 2501.19399): the query
    # at position p is multiplied by log1p(floor((p + 1) / floor_scale)) * attn_scale + 1 (float32, as transformers
    # computes it) before the attention. (floor_scale, attn_scale), or None: no tuning.
    temperature_tuning: tuple[float, float] | None = None
    # Each value head RMS-normed without a weight before it is cached (Gemma 4's v_norm: x * (mean(x^2) + eps)^-0.5
    # in float32, eps the model's rms_norm_eps), after the projection and any value_from_key copy.
    v_norm: bool = False
    # The values are the keys' projection (Gemma 4's attention_k_eq_v on its full-attention layers: no v_proj; v is
    # k_proj's output before the k norm and rotary): k_proj's weight (and bias) read into the v rows too at load.
    value_from_key: bool = False

    def __post_init__(self) -> None:
        if self.qk_norm is True or self.qk_norm is False:
            object.__setattr__(self, "qk_norm", "per_head" if self.qk_norm else None)
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise ValueError(f"GQAConfig qk_norm={self.qk_norm!r} is invalid: allowed: None, "
                             f"{', '.join(map(repr, QK_NORMS))}.")
        if self.qk_norm_after_rope and self.qk_norm != "per_head":
            raise ValueError("GQAConfig qk_norm_after_rope is invalid without qk_norm='per_head'.")
        hv = self.v_head_dim
        if hv is not None and (not isinstance(hv, int) or isinstance(hv, bool) or hv < 1):
            raise unsupported("v_head_dim", hv, "null or a positive integer")
        s = self.value_scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
            raise unsupported("attention_value_scale", s, "a finite number > 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config.json num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}.")
        if self.rope.style not in ("neox", "interleaved"):
            raise ValueError(f"GQAConfig rope style={self.rope.style!r} is invalid: GQA rotates 'neox' or "
                             f"'interleaved' pairs.")
        if self.rope.style == "interleaved" and (self.qk_norm not in (None, "l2") or self.output_gate):
            # Its q/k rows are de-interleaved at load (gqa.rope_rows); a norm's weight or a gate's rows would move too
            # (the weightless "l2" norm of a head is the same whatever the order of its dims).
            raise ValueError("GQAConfig rope style='interleaved' is invalid with a weighted q/k norm or an output "
                             "gate.")
        sc = self.scale
        if sc is not None and (isinstance(sc, bool) or not isinstance(sc, (int, float))
                               or not (math.isfinite(sc) and sc > 0)):
            raise unsupported("attention_multiplier", sc, "a finite number > 0")
        c = self.clip_qkv
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float))
                              or not (math.isfinite(c) and c > 0)):
            raise unsupported("clip_qkv", c, "null or a finite number > 0")
        if c is not None and self.qk_norm == "per_head":
            # The per-head norm runs inside the rotary op, after the clamp would: no family clamps around one.
            raise ValueError("GQAConfig clip_qkv is invalid with qk_norm='per_head': the clamp follows no per-head "
                             "norm.")
        w = self.sliding_window
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
            raise unsupported("sliding_window", w, "null or a positive integer")
        if self.sliding_layers and w is None:
            raise unsupported("sliding_window", w, "a positive integer: layer_types names sliding_attention layers")
        ch = self.attention_chunk_size
        if ch is not None and (not isinstance(ch, int) or isinstance(ch, bool) or ch < 1):
            raise unsupported("attention_chunk_size", ch, "null or a positive integer")
        if ch is not None and (self.sliding_window is not None or self.sinks):
            raise ValueError("GQAConfig attention_chunk_size is invalid with a sliding window or sinks: no family "
                             "combines them.")
        tt = self.temperature_tuning
        if tt is not None and (len(tt) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                   or not math.isfinite(v) for v in tt) or tt[0] <= 0):
            raise unsupported("floor_scale / attn_scale", tt, "a number > 0 and a finite number")
        if self.value_from_key and (self.value_head_dim != self.head_dim or self.value_scale != 1.0
                                    or self.rope.style == "interleaved"):
            raise ValueError("GQAConfig value_from_key is invalid with a v_head_dim of its own, a value_scale or an "
                             "interleaved rope: the v rows are k_proj's as stored.")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.nope_layers):
            raise ValueError(f"GQAConfig nope_layers={self.nope_layers!r} is invalid: layer indices >= 0.")
        if self.rope.rotary_dim > self.head_dim:
            raise ValueError(f"config.json partial_rotary_factor gives rotary_dim={self.rope.rotary_dim}, more than "
                             f"head_dim={self.head_dim}.")

    @property
    def softmax_scale(self) -> float:
        return float(self.scale) if self.scale is not None else self.head_dim**-0.5

    @property
    def value_head_dim(self) -> int:
        """Hv: a value head's width (v_head_dim, else head_dim)."""
        return self.v_head_dim if self.v_head_dim is not None else self.head_dim

    def window(self, layer_idx: int) -> int | None:
        """The sliding window of layer `layer_idx` (None: it attends to the whole context)."""
        return self.sliding_window if layer_idx in self.sliding_layers else None

    def rotates(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` rotates q and k (False on a NoPE layer)."""
        return layer_idx not in self.nope_layers

    def kv_layer_pairs(self, num_layers: int) -> tuple[tuple[int, int], ...] | None:
        """(full layer, sliding layer) pairs that share one set of cache tensors, or None: every layer has its
        own and one block table serves them all (no sliding layers, or unequal counts, e.g. 2 sliding + 1 full,
        where pairing would leave layers unpaired; those keep today's shared table)."""
        if self.sliding_window is None or not self.sliding_layers:
            return None
        sliding = [i for i in range(num_layers) if i in self.sliding_layers]
        full = [i for i in range(num_layers) if i not in self.sliding_layers]
        if len(sliding) != len(full):
            return None
        return tuple(zip(full, sliding))

    def kv_values_per_token(self) -> int:
        """Values one token stores in one layer's cache: a K (H values) and a V (Hv) per kv head."""
        return self.num_kv_heads * (self.head_dim + self.value_head_dim)

    def cache_shapes(self, num_blocks: int, block_size: int,
                     cache_dtype: torch.dtype | None = None) -> tuple[tuple[int, ...], ...]:
        """One layer's cache tensors (k_cache_BLKH, v_cache_BLKHv), the null block included (whatever the dtype)."""
        self.check_block_size(block_size)
        lead = (num_blocks + 1, block_size, self.num_kv_heads)
        return (*lead, self.head_dim), (*lead, self.value_head_dim)

    def check_block_size(self, block_size: int) -> None:
        """A chunk of chunked attention starts at a block boundary (its virtual sequence's block table is the
        sequence's from that block on: kernels/attention_chunks.py): the block size divides the chunk size."""
        ch = self.attention_chunk_size
        if ch is not None and ch % block_size:
            raise ValueError(f"block_size={block_size} is invalid for this model: it must divide its "
                             f"attention_chunk_size={ch} (chunked attention reads each chunk from its first block).")

    def cache_dtypes(self, cache_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        """The element types of cache_shapes' tensors: both in the cache's dtype."""
        return cache_dtype, cache_dtype

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.kv_values_per_token() * dtype.itemsize


__all__ = ["GQAConfig", "QK_NORMS"]
