"""The layer kinds of a model, as config: its attention kind (and what its KV cache holds per token), its MoE
layout. Read from config.json by engine/config/hf_readers.py; pure data, no model code, no device.

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
  scales per 128 values as bytes (engine/config/sparse_attention.py).
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

from moelink.moe.router_config import RouterConfig

from .sparse_attention import IndexerConfig

# rope_parameters.rope_type values moelink implements: "default" (plain RoPE) and "yarn" (inverse frequencies
# and the attention factor from transformers' own ROPE_INIT_FUNCTIONS, so they are the library's numbers).
ROPE_TYPES = ("default", "yarn")
# How the rotated dimensions pair up: "neox" rotates (x[i], x[i + R/2]) (Hugging Face rotate_half);
# "interleaved" rotates (x[2i], x[2i + 1]) and returns the halves de-interleaved (DeepSeek-V3 rope_interleave:
# the checkpoint's rope rows are de-interleaved at load, after which it runs as neox); "complex" rotates
# (x[2i], x[2i + 1]) as complex numbers in float32 (DeepSeek-V2, as transformers computes it).
ROPE_STYLES = ("neox", "interleaved", "complex")
# The experts' gated activations (kernels.moe.MoEActivation's kinds).
MOE_ACTIVATIONS = ("silu", "swiglu_oai", "silu_clamp")
# GQA's q/k RMSNorm (GQAConfig.qk_norm): "per_head" normalises each head's H dims with one [H] weight shared by the
# heads (Qwen3-MoE, GLM's use_qk_norm); "all_heads" normalises a token's whole q (N * H dims) and k (K * H) before
# they are split into heads, with [N * H] / [K * H] weights (MiniMax-M2's qk_norm_type "per_layer").
QK_NORMS = ("per_head", "all_heads")


def unsupported(field_name: str, value, allowed, why: str = "") -> ValueError:
    """The one-sentence error for a config.json value moelink cannot run: the field, the value, what is allowed."""
    allowed = ", ".join(repr(a) for a in allowed) if isinstance(allowed, tuple) else allowed
    return ValueError(f"config.json {field_name}={value!r} is not supported{why}: allowed: {allowed}.")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind: the first `rotary_dim` dims of each head (GQA; GLM rotates a
    `partial_rotary_factor` prefix) or the rope part of each head (MLA's qk_rope_head_dim)."""

    rotary_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    style: str = "neox"
    # Where transformers keeps this rope's parameters when a model has one rope per layer kind: the key of
    # config.json's rope_parameters ({"full_attention": {...}, "sliding_attention": {...}}, MiMo-V2-Flash), passed
    # as `layer_type` to transformers' rope init for the scaled types. None: rope_parameters is one rope.
    layer_type: str | None = None
    # Qwen's multimodal rotary (3-D: temporal, height, width positions), interleaved as Qwen3.5 lays it out
    # (transformers' Qwen3_5MoeTextRotaryEmbedding.recomposition_frequencies): frequency i turns by the height
    # position when i % 3 == 1 and i < 3 * mrope_section[1], by the width one when i % 3 == 2 and i < 3 *
    # mrope_section[2], by the temporal one otherwise. Text tokens have three equal positions, so a text-only step
    # runs as plain 1-D rope; () : no multimodal rotary (engine/models/rope.py RotaryEmbedding.mrope_table).
    mrope_section: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mrope_section and (len(self.mrope_section) != 3 or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.mrope_section)):
            raise ValueError(f"mrope_section={list(self.mrope_section)!r} is invalid: must be three integers >= 0.")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported: allowed: {', '.join(ROPE_TYPES)}.")
        if self.style not in ROPE_STYLES:
            raise ValueError(f"rope style={self.style!r} is invalid: allowed: {', '.join(ROPE_STYLES)}.")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim={self.rotary_dim} is invalid: must be an even number >= 2.")


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

    def __post_init__(self) -> None:
        if self.qk_norm is True or self.qk_norm is False:
            object.__setattr__(self, "qk_norm", "per_head" if self.qk_norm else None)
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise ValueError(f"GQAConfig qk_norm={self.qk_norm!r} is invalid: allowed: None, "
                             f"{', '.join(map(repr, QK_NORMS))}.")
        hv = self.v_head_dim
        if hv is not None and (not isinstance(hv, int) or isinstance(hv, bool) or hv < 1):
            raise unsupported("v_head_dim", hv, "null or a positive integer")
        s = self.value_scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
            raise unsupported("attention_value_scale", s, "a finite number > 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config.json num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}.")
        w = self.sliding_window
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
            raise unsupported("sliding_window", w, "null or a positive integer")
        if self.sliding_layers and w is None:
            raise unsupported("sliding_window", w, "a positive integer: layer_types names sliding_attention layers")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.nope_layers):
            raise ValueError(f"GQAConfig nope_layers={self.nope_layers!r} is invalid: layer indices >= 0.")
        if self.rope.rotary_dim > self.head_dim:
            raise ValueError(f"config.json partial_rotary_factor gives rotary_dim={self.rope.rotary_dim}, more than "
                             f"head_dim={self.head_dim}.")

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5

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
        lead = (num_blocks + 1, block_size, self.num_kv_heads)
        return (*lead, self.head_dim), (*lead, self.value_head_dim)

    def cache_dtypes(self, cache_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        """The element types of cache_shapes' tensors: both in the cache's dtype."""
        return cache_dtype, cache_dtype

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.kv_values_per_token() * dtype.itemsize


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
    # DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): the layer's lightning indexer (engine/config/sparse_attention.py),
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
        fp8 row's bytes: engine/config/sparse_attention.py). `cache_dtype` (the latent's) decides an unresolved
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


AttentionConfig = GQAConfig | MLAConfig


@dataclass(frozen=True)
class MoEConfig:
    """How the MoE layers are laid out and routed, beyond ModelConfig's num_experts and top_k.

    router: the routing scheme (moe.router.RouterConfig; `make_router(router)` builds it).
    n_shared_experts: always-on experts beside the routed ones in every MoE layer (DeepSeek, GLM), one dense
    MLP of n_shared_experts * moe_intermediate_size. first_k_dense_replace: the first k layers have a dense
    MLP. moe_layer_freq: every n-th layer after them is sparse; transformers implements 1 only, so that is all
    that is accepted.
    """

    router: RouterConfig
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    # gpt-oss: the router linear has a bias (router.bias), each expert has gate/up and down biases, and the
    # experts' gated activation is the clamped SwiGLU: "swiglu_oai" with swiglu_alpha / swiglu_limit (plain
    # data here, so reading a config loads no kernel module; the decoder builds kernels.moe.MoEActivation).
    router_bias: bool = False
    expert_bias: bool = False
    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # The shared MLP's width when the family names it apart (Qwen3-Next's shared_expert_intermediate_size); 0:
    # n_shared_experts * moe_intermediate_size. shared_expert_gate: its output is scaled by sigmoid(x . w) per token
    # (Qwen3-Next's shared_expert_gate, a [1, D] linear).
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    # Zero-computation experts (LongCat-Flash's zero_expert_num): the router scores this many more than the routed
    # experts, and a pick of one is the token itself times its weight (moe/layer.MoELayer): no weights, no traffic.
    zero_experts: int = 0
    # The gated activation of the dense layers' MLP and the shared experts, with the experts' swiglu_alpha /
    # swiglu_limit: MiniMax-M3's "swiglu_oai", GLM-5.3-Flash's "silu_clamp"; "silu" for every other family.
    dense_activation: str = "silu"

    def __post_init__(self) -> None:
        if not isinstance(self.router, RouterConfig):
            raise ValueError(f"MoEConfig router={self.router!r} must be a moelink.moe.router.RouterConfig.")
        for name in ("activation", "dense_activation"):
            if getattr(self, name) not in MOE_ACTIVATIONS:
                raise ValueError(f"MoEConfig {name}={getattr(self, name)!r} is invalid: allowed: "
                                 f"{', '.join(MOE_ACTIVATIONS)}.")
        for name in ("swiglu_alpha", "swiglu_limit"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise unsupported(name, v, "a number > 0")
        for name in ("n_shared_experts", "first_k_dense_replace", "shared_expert_intermediate_size", "zero_experts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise unsupported(name, v, "an integer >= 0")
        if self.moe_layer_freq != 1:
            raise unsupported("moe_layer_freq", self.moe_layer_freq, (1,),
                              " (transformers puts experts in every layer from first_k_dense_replace on)")
