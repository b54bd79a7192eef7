"""Attention kinds of the cluster model's shapes (planner/model_shape.ModelShape holds them): MLA and its DSA indexer,
DeepSeek-V4's compressed MQA, GQA, linear-attention and sliding-window layers. The 2026 kinds (block-sparse, QSA,
hyper-connections, n-gram tables) are in planner/sparse_kinds.py. Pure data and the arithmetic of each kind alone.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MLA:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi K2). `gate_out`: the width of an output gate's projection
    from hidden (Hunyuan Hy4's element-wise gate: num_heads x v_dim; Ling's per-head gate: num_heads; 0: none)."""

    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_dim: int
    gate_out: int = 0


@dataclass(frozen=True)
class DSA:
    """DeepSeek Sparse Attention beside MLA (DeepSeek-V3.2, GLM-5): a lightning indexer of `index_heads` heads of
    `index_head_dim` scores every cached token (one cached key of index_head_dim per token and layer) and MLA attends
    to the `topk` best only.

    `shared_layers` of the model's DSA layers have no indexer of their own and attend to the positions the previous
    full layer selected (GLM-5 / Hunyuan Hy4 `indexer_types` "shared": no indexer weights, no index key cached, no
    scoring). `kpool` > 1: GLM-5.3-Flash's pooled selection (engine/models/dsa_config.py): each token caches a
    [key | gate] row (2 x index_head_dim), a query scores one pooled key per `kpool` tokens (pooled from the rows it
    reads) and attends to the tokens of the topk / kpool best pools plus its own incomplete pool (topk + kpool - 1)."""

    index_heads: int
    index_head_dim: int
    topk: int
    kpool: int = 1
    shared_layers: int = 0

    def __post_init__(self) -> None:
        if self.kpool < 1 or self.topk % self.kpool or self.shared_layers < 0:
            raise ValueError(f"DSA kpool={self.kpool} must be >= 1 and divide topk={self.topk}; shared_layers="
                             f"{self.shared_layers} must be >= 0.")

    @property
    def key_elems(self) -> int:
        """Values one token caches for a full indexer: its key, and the pooled indexer's gate beside it."""
        return self.index_head_dim * (2 if self.kpool > 1 else 1)

    @property
    def width(self) -> int:
        """Positions one query attends to at most."""
        return self.topk + self.kpool - 1


@dataclass(frozen=True)
class CompressedMQA:
    """Compressed attention, DeepSeek-V4's (engine/models/compressed_attention_config.py): one shared KV head of `head_dim`
    that is its own value (MQA, all heads), a window of the last `window` raw tokens in every layer, and per layer
    kind compressed entries:
    `csa_layers` compressed sparse layers (an entry per `csa_rate` tokens, a lightning indexer of `index_heads` x
    `index_head_dim` scores every entry and attention reads the `topk` best), `hca_layers` heavily compressed ones
    (an entry per `hca_rate` tokens, read densely), `sliding_layers` with the window alone; q LoRA, and the grouped
    output projection (`o_groups` groups of heads, each to `o_lora_rank`, then to hidden)."""

    num_heads: int
    head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window: int
    sliding_layers: int
    csa_layers: int
    hca_layers: int
    topk: int
    csa_rate: int = 4
    hca_rate: int = 128
    index_heads: int = 64
    index_head_dim: int = 128

    @property
    def layers(self) -> int:
        return self.sliding_layers + self.csa_layers + self.hca_layers


@dataclass(frozen=True)
class GQA:
    """Grouped-query attention. `v_head_dim`: values narrower than q / k (MiMo-V2-Flash: 128 beside 192); 0 = head_dim.
    `gate`: an output gate as wide as the queries (Qwen3-Next / Qwen3.8's gated attention)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int = 0
    gate: bool = False

    @property
    def v_dim(self) -> int:
        return self.v_head_dim or self.head_dim


@dataclass(frozen=True)
class LinearAttention:
    """Linear-attention layers in place of some attention layers (the hybrids): gated DeltaNet (Qwen3-Next,
    engine/models/gated_deltanet.py) and Kimi Delta Attention (Kimi Linear, Ling's hybrid; engine/models/kimi_delta.py).

    `layers` of the model's attention blocks run it. Per sequence and layer it keeps a float32 state of `num_heads` x
    `head_k_dim` x `head_v_dim` (read and written once per step) and its short convolution's last `conv_kernel` - 1
    inputs of q, k and v; nothing grows with the context. Projections: q and k (`num_k_heads` of head_k_dim), v and
    the output (num_heads of head_v_dim), the output gate (full, or low-rank when `gate_rank`: KDA's g_a / g_b), the
    decay (a scalar per head, or KDA's one per key channel: `decay_per_channel`, through rank `decay_rank` when set:
    f_a / f_b) and beta."""

    layers: int
    num_heads: int
    num_k_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int = 4
    gate_rank: int = 0
    decay_per_channel: bool = False
    decay_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("layers", "num_heads", "num_k_heads", "head_k_dim", "head_v_dim", "conv_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"LinearAttention {name}={getattr(self, name)} must be >= 1.")
        if self.num_heads % self.num_k_heads:
            raise ValueError(f"LinearAttention num_heads={self.num_heads} must be a multiple of "
                             f"num_k_heads={self.num_k_heads}.")

    def proj_params(self, hidden: int) -> int:
        """Weights of one layer's projections."""
        qk, v = 2 * self.num_k_heads * self.head_k_dim, self.num_heads * self.head_v_dim
        gate = hidden * self.gate_rank + self.gate_rank * v if self.gate_rank else hidden * v
        decay_out = self.num_heads * (self.head_k_dim if self.decay_per_channel else 1)
        decay = hidden * self.decay_rank + self.decay_rank * decay_out if self.decay_rank else hidden * decay_out
        return hidden * (qk + v) + gate + decay + hidden * self.num_heads + v * hidden  # ... beta, o_proj

    def state_bytes(self, conv_bytes: float = 2.0) -> float:
        """One sequence's state in one layer: the float32 recurrent state and the convolution's inputs."""
        conv = (self.conv_kernel - 1) * (2 * self.num_k_heads * self.head_k_dim + self.num_heads * self.head_v_dim)
        return self.num_heads * self.head_k_dim * self.head_v_dim * 4 + conv * conv_bytes

    def flops_per_token(self, decode: bool) -> float:
        """One token in one layer past the projections: the delta rule's read (S^T k), outer-product write, decay and
        output read (q S), each ~2 FLOPs per state element (8 in all); a prefill chunk (64 tokens, the chunked
        form) adds its within-chunk products, q k^T and the attention-weighted values."""
        per_state = 8 * self.num_heads * self.head_k_dim * self.head_v_dim
        return per_state if decode else per_state + 2 * 64 * self.num_heads * (self.head_k_dim + self.head_v_dim)


@dataclass(frozen=True)
class SlidingWindow:
    """`layers` of the attention layers attend to their last `window` tokens only (EXAONE-MoE's 3 of 4): their KV
    is per-sequence state of at most `window` tokens, not per token of context."""

    layers: int
    window: int
    num_kv_heads: int = 0  # a GQA model's sliding layers' own kv heads (MiMo-V2-Flash: twice the full ones'); 0: as those

    def __post_init__(self) -> None:
        if self.layers < 1 or self.window < 1 or self.num_kv_heads < 0:
            raise ValueError(f"SlidingWindow layers={self.layers} and window={self.window} must be >= 1, "
                             f"num_kv_heads={self.num_kv_heads} >= 0.")
