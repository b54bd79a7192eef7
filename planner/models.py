"""Model shapes for the cluster model, from the public config.json values tabled in REFERENCES.md.

Counts only what decides time: parameters touched per token (per layer kind),
attention FLOPs per (query, key) pair and KV bytes per cached token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MLA:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi K2)."""

    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_dim: int


@dataclass(frozen=True)
class DSA:
    """DeepSeek Sparse Attention beside MLA (DeepSeek-V3.2, GLM-5): a lightning indexer of `index_heads` heads of
    `index_head_dim` scores every cached token (one cached key of index_head_dim per token and layer) and MLA attends
    to the `topk` best only."""

    index_heads: int
    index_head_dim: int
    topk: int


@dataclass(frozen=True)
class CompressedMQA:
    """Compressed attention, DeepSeek-V4's (engine/config/compressed_attention.py): one shared KV head of `head_dim`
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
    """Grouped-query attention."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


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

    def __post_init__(self) -> None:
        if self.layers < 1 or self.window < 1:
            raise ValueError(f"SlidingWindow layers={self.layers} and window={self.window} must be >= 1.")


@dataclass(frozen=True)
class ModelShape:
    """A MoE decoder. Dense layers come first (`first_dense` of them, intermediate `dense_intermediate`).

    n_group/topk_group: group-limited routing (DeepSeek-V3: 8/4); 1/1 means none.
    mtp_layers: multi-token-prediction modules shipped with the checkpoint (each one decoder layer).
    linear / sliding: hybrids, where some attention blocks run linear attention or a sliding window (their state is
    per sequence); `attention` is the kind of the rest. Methods that return a per-layer figure return the mean over
    the num_layers layers, so that callers' `x num_layers` is the model's total.
    zero_experts: LongCat-Flash's zero-computation experts, routed to like the others but returning the token
    itself: no weights, no dispatch; picks reach a real expert num_experts / (num_experts + zero_experts) of the
    time under uniform routing (`routed_top_k`).
    sublayers / dense_beside_moe: LongCat-Flash's shortcut-connected layer, `sublayers` attention blocks and
    `dense_beside_moe` dense FFNs beside each MoE layer's routed experts.
    """

    name: str
    num_layers: int
    first_dense: int
    hidden: int
    dense_intermediate: int
    attention: MLA | GQA | CompressedMQA
    num_experts: int
    num_shared: int
    top_k: int
    moe_intermediate: int
    vocab: int
    n_group: int = 1
    topk_group: int = 1
    mtp_layers: int = 0
    dsa: DSA | None = None  # sparse attention (MLA models only)
    linear: LinearAttention | None = None
    sliding: SlidingWindow | None = None
    zero_experts: int = 0
    sublayers: int = 1
    dense_beside_moe: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.first_dense < self.num_layers:
            raise ValueError(f"model {self.name}: first_dense={self.first_dense} must be in [0, num_layers).")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"model {self.name}: top_k={self.top_k} must be in [1, num_experts={self.num_experts}].")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"model {self.name}: n_group={self.n_group}/topk_group={self.topk_group} do not fit "
                             f"{self.num_experts} experts.")
        if isinstance(self.attention, CompressedMQA) and self.attention.layers != self.num_layers:
            raise ValueError(f"model {self.name}: its sliding, CSA and HCA layers ({self.attention.layers}) must be "
                             f"its num_layers={self.num_layers}.")
        if self.zero_experts < 0 or self.sublayers < 1 or self.dense_beside_moe < 0:
            raise ValueError(f"model {self.name}: zero_experts={self.zero_experts}, sublayers={self.sublayers} and "
                             f"dense_beside_moe={self.dense_beside_moe} must be >= 0, >= 1 and >= 0.")
        other = (self.linear.layers if self.linear else 0) + (self.sliding.layers if self.sliding else 0)
        if other and isinstance(self.attention, CompressedMQA):
            raise ValueError(f"model {self.name}: linear / sliding layers beside compressed attention are not modelled.")
        if other >= self.attention_blocks:
            raise ValueError(f"model {self.name}: its linear and sliding layers ({other}) must leave some of its "
                             f"{self.attention_blocks} attention blocks to `attention`.")

    @property
    def attention_blocks(self) -> int:
        """Attention blocks of every kind (LongCat-Flash: two per layer)."""
        return self.num_layers * self.sublayers

    @property
    def full_attention_layers(self) -> int:
        """Blocks that run `attention` over the whole context (not linear, not sliding)."""
        return (self.attention_blocks - (self.linear.layers if self.linear else 0)
                - (self.sliding.layers if self.sliding else 0))

    @property
    def kv_attention_layers(self) -> int:
        """Blocks that run `attention` (full or sliding): the ones with its weights and cache format."""
        return self.attention_blocks - (self.linear.layers if self.linear else 0)

    @property
    def routed_top_k(self) -> float:
        """Picks per token that reach a real expert (all of top_k without zero-computation experts)."""
        return self.top_k * self.num_experts / (self.num_experts + self.zero_experts)

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense

    @property
    def is_mla(self) -> bool:
        return isinstance(self.attention, MLA)

    def attn_proj_params(self) -> float:
        """Weights of the attention projections of one layer, the mean over the layers (linear-attention layers their
        own; LongCat-Flash: both sublayers)."""
        lin = self.linear.layers * self.linear.proj_params(self.hidden) if self.linear else 0
        return (self.kv_attention_layers * self._attention_proj_params() + lin) / self.num_layers

    def _attention_proj_params(self) -> float:
        """Weights of one `attention` block's projections (both MLA forms touch the same count)."""
        a = self.attention
        h = self.hidden
        if isinstance(a, MLA):
            q_dim = a.num_heads * (a.qk_nope_dim + a.qk_rope_dim)
            q = h * a.q_lora_rank + a.q_lora_rank * q_dim if a.q_lora_rank else h * q_dim
            kv_a = h * (a.kv_lora_rank + a.qk_rope_dim)
            # kv_b in prefill; in absorbed decode the same weights act as W_UK and W_UV.
            kv_b = a.kv_lora_rank * a.num_heads * (a.qk_nope_dim + a.v_dim)
            d = self.dsa
            index = (a.q_lora_rank * d.index_heads * d.index_head_dim + h * (d.index_head_dim + d.index_heads)
                     if d else 0)  # wq_b, wk, weights_proj
            return q + kv_a + kv_b + a.num_heads * a.v_dim * h + index
        if isinstance(a, CompressedMQA):  # the mean over the layers: compressors and indexers on some only
            H, I, NH = a.head_dim, a.index_head_dim, a.num_heads * a.head_dim
            base = h * a.q_lora_rank + a.q_lora_rank * NH + h * H + NH * a.o_lora_rank + a.o_groups * a.o_lora_rank * h
            csa = 4 * h * H + a.q_lora_rank * a.index_heads * I + h * a.index_heads + 4 * h * I
            return base + (a.csa_layers * csa + a.hca_layers * 2 * h * H) / a.layers
        return h * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim + a.num_heads * a.head_dim * h

    def weight_matrices(self) -> list[tuple[str, int, int, int]]:
        """(kind, rows, columns, count) of every weight matrix, laid out as the engine holds them (stacked
        q/k/v; MLA's q_a + kv_a; gate + up), routed experts per expert per MoE layer. Kinds: "attn", "kv_b"
        (MLA's, absorbed: the engine keeps it in the activation dtype), "dense", "shared", "expert",
        "router", "embed" (embedding and LM head)."""
        a, h, L = self.attention, self.hidden, self.kv_attention_layers
        if isinstance(a, MLA):
            q_dim = a.num_heads * (a.qk_nope_dim + a.qk_rope_dim)
            first = (a.q_lora_rank or q_dim) + a.kv_lora_rank + a.qk_rope_dim
            out = [("attn", first, h, L), ("kv_b", a.num_heads * (a.qk_nope_dim + a.v_dim), a.kv_lora_rank, L),
                   ("attn", h, a.num_heads * a.v_dim, L)]
            if a.q_lora_rank:
                out.append(("attn", q_dim, a.q_lora_rank, L))
            if self.dsa:  # the indexer's wq_b and wk (FP8 as published), weights_proj (float: "kv_b"'s format)
                d = self.dsa
                out += [("attn", d.index_heads * d.index_head_dim, a.q_lora_rank, L), ("attn", d.index_head_dim, h, L),
                        ("kv_b", d.index_heads, h, L)]
        elif isinstance(a, CompressedMQA):
            # q_a, q_b, wkv, the grouped o_a (o_groups blocks each layer), o_b; compressors and the indexer's
            # weights_proj in bf16 as published ("kv_b"'s format), the indexer's wq_b as the other projections.
            H, I, NH, G, O = a.head_dim, a.index_head_dim, a.num_heads * a.head_dim, a.o_groups, a.o_lora_rank
            out = [("attn", a.q_lora_rank, h, L), ("attn", NH, a.q_lora_rank, L), ("attn", H, h, L),
                   ("attn", O, NH // G, L * G), ("attn", h, G * O, L),
                   ("kv_b", 4 * H, h, a.csa_layers), ("kv_b", 2 * H, h, a.hca_layers),
                   ("attn", a.index_heads * I, a.q_lora_rank, a.csa_layers), ("kv_b", a.index_heads, h, a.csa_layers),
                   ("kv_b", 4 * I, h, a.csa_layers)]
        else:
            out = [("attn", (a.num_heads + 2 * a.num_kv_heads) * a.head_dim, h, L),
                   ("attn", h, a.num_heads * a.head_dim, L)]
        if self.linear:  # q / k / v / decay / beta / gate in, o out (the low-rank gates' second halves as "attn")
            n = self.linear
            qkv = 2 * n.num_k_heads * n.head_k_dim + n.num_heads * n.head_v_dim
            gate_in = n.gate_rank or n.num_heads * n.head_v_dim
            decay_out = n.num_heads * (n.head_k_dim if n.decay_per_channel else 1)
            decay_in = n.decay_rank or decay_out
            out += [("attn", qkv + gate_in + decay_in + n.num_heads, h, n.layers),
                    ("attn", h, n.num_heads * n.head_v_dim, n.layers)]
            if n.gate_rank:
                out.append(("attn", n.num_heads * n.head_v_dim, n.gate_rank, n.layers))
            if n.decay_rank:
                out.append(("attn", decay_out, n.decay_rank, n.layers))
        di, mi = self.dense_intermediate, self.moe_intermediate
        dense_n = self.first_dense + self.dense_beside_moe * self.moe_layers
        out += [("dense", 2 * di, h, dense_n), ("dense", h, di, dense_n),
                ("shared", 2 * mi * self.num_shared, h, self.moe_layers), ("shared", h, mi * self.num_shared, self.moe_layers),
                ("expert", 2 * mi, h, self.moe_layers * self.num_experts), ("expert", h, mi, self.moe_layers * self.num_experts),
                ("router", self.num_experts + self.zero_experts, h, self.moe_layers), ("embed", self.vocab, h, 2)]
        return [m for m in out if m[1] and m[2] and m[3]]

    def expert_params(self) -> int:
        """One routed (or shared) expert: gate, up, down."""
        return 3 * self.hidden * self.moe_intermediate

    def dense_ffn_params(self) -> int:
        return 3 * self.hidden * self.dense_intermediate

    def attn_flops_per_key(self, decode: bool) -> float:
        """FLOPs per (query token, cached key) pair in one layer.

        MLA decode runs absorbed (MQA over the 512+64 latent: QK over 576, PV over
        512, all heads); MLA prefill runs as plain MHA over 192-dim keys / 128-dim
        values, the cheaper form for long chunks (TensorRT-LLM tech blog 3).
        """
        a = self.attention
        if isinstance(a, MLA):
            if decode:
                return 2 * a.num_heads * (a.kv_lora_rank + a.qk_rope_dim) + 2 * a.num_heads * a.kv_lora_rank
            return 2 * a.num_heads * (a.qk_nope_dim + a.qk_rope_dim) + 2 * a.num_heads * a.v_dim
        return 4 * a.num_heads * a.head_dim  # GQA, and V4's MQA (QK and PV over head_dim, every head)

    def kv_elems_per_token(self) -> float:
        """Cached elements per token of context per layer, the mean over the layers: the full-context attention
        blocks' (MLA: latent + rope key, and DSA's indexer key; GQA: K and V); linear and sliding layers keep state
        instead (state_bytes_per_sequence)."""
        return self._kv_elems_per_block() * self.full_attention_layers / self.num_layers

    def _kv_elems_per_block(self) -> float:
        """Cached elements per token of one `attention` block."""
        a = self.attention
        if isinstance(a, MLA):
            return a.kv_lora_rank + a.qk_rope_dim + (self.dsa.index_head_dim if self.dsa else 0)
        if isinstance(a, CompressedMQA):  # paged per token of context, the mean over the layers (the window is state)
            return (a.csa_layers * (a.head_dim + a.index_head_dim) / a.csa_rate
                    + a.hca_layers * a.head_dim / a.hca_rate) / a.layers
        return 2 * a.num_kv_heads * a.head_dim

    def state_bytes_per_sequence(self, kv_bytes: float) -> float:
        """Bytes each sequence keeps whatever its length (DeepSeek-V4: every layer's window of raw KV at `kv_bytes`
        per value, and the compressors' running kv and gate rows in float32, as the engine keeps them: CSA 2 x rate
        tokens of 4 x head_dim and its indexer's of 4 x index_head_dim, HCA rate tokens of 2 x head_dim); 0 for
        linear-attention layers their state (LinearAttention.state_bytes), sliding layers their window of KV at
        `kv_bytes`; 0 for every other model."""
        a = self.attention
        if not isinstance(a, CompressedMQA):
            lin = self.linear.layers * self.linear.state_bytes() if self.linear else 0.0
            win = (self.sliding.layers * self.sliding.window * self._kv_elems_per_block() * kv_bytes if self.sliding
                   else 0.0)
            return lin + win
        H, I = a.head_dim, a.index_head_dim
        rows = a.csa_layers * 2 * a.csa_rate * (4 * H + 4 * I) + a.hca_layers * a.hca_rate * 2 * H
        return a.layers * a.window * H * kv_bytes + rows * 4

    def state_traffic_bytes(self) -> float:
        """Bytes of per-sequence state one step reads and writes in one layer, the mean over the layers: the
        linear-attention layers' recurrent state (float32, read and written once a step; 0 without them)."""
        return 2 * self.linear.layers * self.linear.state_bytes() / self.num_layers if self.linear else 0.0

    def attention_work(self, keys: float, decode: bool) -> tuple[float, float]:
        """(FLOPs per query token, cached elements read per sequence) of one layer's attention over `keys` cached
        tokens, the mean over the layers: full-context blocks over every key, sliding ones over at most their
        window, linear-attention ones a constant per token (their state's bytes: state_traffic_bytes)."""
        full_f, full_e = self._block_attention_work(keys, decode)
        flops, elems = self.full_attention_layers * full_f, self.full_attention_layers * full_e
        if self.sliding:
            win_f, win_e = self._block_attention_work(min(keys, self.sliding.window), decode)
            flops, elems = flops + self.sliding.layers * win_f, elems + self.sliding.layers * win_e
        if self.linear:
            flops += self.linear.layers * self.linear.flops_per_token(decode)
        return flops / self.num_layers, elems / self.num_layers

    def _block_attention_work(self, keys: float, decode: bool) -> tuple[float, float]:
        """attention_work of one `attention` block. Dense: every key, all its elements. DSA: the indexer scores every key (its index key read; H heads
        of D, 2 FLOPs each) and MLA attends to min(keys, topk) latents only (engine: kernels/dsa.py)."""
        a = self.attention
        if isinstance(a, CompressedMQA):
            # Per layer (the mean): the window's raw keys, then HCA's entries all, CSA's top-k of its entries, which
            # the indexer scores every one of (its keys read).
            per_key, H = self.attn_flops_per_key(decode), a.head_dim
            win = min(keys, a.window)
            csa_e, hca_e = keys / a.csa_rate, keys / a.hca_rate
            sel = min(csa_e, a.topk)
            flops = (a.layers * win * per_key + a.csa_layers * (sel * per_key + csa_e * 2 * a.index_heads
                                                                 * a.index_head_dim) + a.hca_layers * hca_e * per_key)
            elems = (a.layers * win * H + a.csa_layers * (sel * H + csa_e * a.index_head_dim)
                     + a.hca_layers * hca_e * H)
            return flops / a.layers, elems / a.layers
        d = self.dsa
        if d is None:
            return keys * self.attn_flops_per_key(decode), keys * self._kv_elems_per_block()
        a = self.attention
        sel = min(keys, d.topk)
        flops = sel * self.attn_flops_per_key(decode) + keys * 2 * d.index_heads * d.index_head_dim
        return flops, sel * (a.kv_lora_rank + a.qk_rope_dim) + keys * d.index_head_dim

    def total_params(self) -> float:
        """All weights (embedding and LM head counted once each); for memory checks."""
        per_attn = self.attn_proj_params()
        moe = ((self.num_experts + self.num_shared) * self.expert_params()
               + self.hidden * (self.num_experts + self.zero_experts))
        return (self.num_layers * per_attn + (self.first_dense + self.dense_beside_moe * self.moe_layers)
                * self.dense_ffn_params() + self.moe_layers * moe + 2 * self.vocab * self.hidden)

    def active_params(self) -> float:
        """Weights one token touches: every layer's attention (and dense FFNs), routed_top_k routed and the shared
        experts of each MoE layer, the LM head (the embedding row is a lookup)."""
        return (self.num_layers * self.attn_proj_params()
                + (self.first_dense + self.dense_beside_moe * self.moe_layers) * self.dense_ffn_params()
                + self.moe_layers * (self.routed_top_k + self.num_shared) * self.expert_params()
                + self.vocab * self.hidden)


_DS_MLA = MLA(num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_dim=128)

MODELS = {
    m.name: m
    for m in (
        ModelShape("deepseek-v3", num_layers=61, first_dense=3, hidden=7168, dense_intermediate=18432,
                   attention=_DS_MLA, num_experts=256, num_shared=1, top_k=8, moe_intermediate=2048,
                   vocab=129280, n_group=8, topk_group=4, mtp_layers=1),
        ModelShape("kimi-k2", num_layers=61, first_dense=1, hidden=7168, dense_intermediate=18432,
                   attention=MLA(64, 1536, 512, 128, 64, 128), num_experts=384, num_shared=1, top_k=8,
                   moe_intermediate=2048, vocab=163840),
        ModelShape("qwen3-235b-a22b", num_layers=94, first_dense=0, hidden=4096, dense_intermediate=12288,
                   attention=GQA(64, 4, 128), num_experts=128, num_shared=0, top_k=8, moe_intermediate=1536,
                   vocab=151936),
        ModelShape("qwen3-30b-a3b", num_layers=48, first_dense=0, hidden=2048, dense_intermediate=6144,
                   attention=GQA(32, 4, 128), num_experts=128, num_shared=0, top_k=8, moe_intermediate=768,
                   vocab=151936),
        ModelShape("mixtral-8x22b", num_layers=56, first_dense=0, hidden=6144, dense_intermediate=16384,
                   attention=GQA(48, 8, 128), num_experts=8, num_shared=0, top_k=2, moe_intermediate=16384,
                   vocab=32768),
        ModelShape("mixtral-8x7b", num_layers=32, first_dense=0, hidden=4096, dense_intermediate=14336,
                   attention=GQA(32, 8, 128), num_experts=8, num_shared=0, top_k=2, moe_intermediate=14336,
                   vocab=32000),
    )
}
MODELS["deepseek-r1"] = MODELS["deepseek-v3"]  # same architecture and shapes
# DeepSeek-V3.2 (-Exp): V3's shapes with a lightning indexer per layer (64 heads of 128, top-2048). GLM-5: 78 layers of
# MLA (64 heads, nope 192, v 256, q LoRA 2048) with a 32-head indexer; every layer counted with its own indexer (its
# "shared" layers, which reuse a previous layer's selection, would read fewer index keys).
MODELS["deepseek-v3.2"] = replace(MODELS["deepseek-v3"], name="deepseek-v3.2", dsa=DSA(64, 128, 2048))
MODELS["glm-5"] = ModelShape("glm-5", num_layers=78, first_dense=3, hidden=6144, dense_intermediate=12288,
                             attention=MLA(64, 2048, 512, 192, 64, 256), num_experts=256, num_shared=1, top_k=8,
                             moe_intermediate=2048, vocab=154880, mtp_layers=1, dsa=DSA(32, 128, 2048))
# Kimi K2 Thinking / K2.5 (the text model: K2's shapes; K2.5's vision tower, ~0.4B, is not loaded by moelink): the
# shapes of kimi-k2, published with INT4 routed experts (plan with --precision int4).
for _name in ("kimi-k2.5", "kimi-k2-thinking"):
    MODELS[_name] = replace(MODELS["kimi-k2"], name=_name)

# DeepSeek-V4 (issue 45; engine/config/compressed_attention.py). Shapes from transformers 5.24's DeepseekV4Config
# docstring (heads, head_dim 512, o_groups, o_lora_rank) and the public model cards (V4-Flash: 43 layers, hidden
# 4096, 256 experts of 2048, top-6, q LoRA 1024, layers 0-1 window only then CSA / HCA alternating from CSA, index
# top-512; V4-Pro: 61 layers, hidden 7168, 384 experts of 3072, q LoRA 1536, layers 0-1 HCA then HCA / CSA
# alternating, index top-1024); both: one shared expert, every layer MoE (the first 3 hash-routed: no router GEMM,
# the same expert work), window 128, one MTP layer. Their totals match the cards' 284B / 1.6T (tests/planner:
# test_rows_match_published_sizes).
MODELS["deepseek-v4-flash"] = ModelShape(
    "deepseek-v4-flash", num_layers=43, first_dense=0, hidden=4096, dense_intermediate=0,
    attention=CompressedMQA(64, 512, 1024, o_groups=8, o_lora_rank=1024, window=128, sliding_layers=2, csa_layers=21,
                            hca_layers=20, topk=512),
    num_experts=256, num_shared=1, top_k=6, moe_intermediate=2048, vocab=129280, mtp_layers=1)
MODELS["deepseek-v4-pro"] = ModelShape(
    "deepseek-v4-pro", num_layers=61, first_dense=0, hidden=7168, dense_intermediate=0,
    attention=CompressedMQA(128, 512, 1536, o_groups=16, o_lora_rank=1024, window=128, sliding_layers=0,
                            csa_layers=29, hca_layers=32, topk=1024),
    num_experts=384, num_shared=1, top_k=6, moe_intermediate=3072, vocab=129280, mtp_layers=1)

# The hybrids and LongCat-Flash (issue 57), from their published config.json values (transformers 5.24's configs
# default to them; `auto_docstring(checkpoint=...)` names each). Qwen3-Next-80B-A3B: 48 layers, 36 gated DeltaNet
# (32 value / 16 key heads of 128) and 12 GQA (16 heads, 2 KV, 256; its output gate's extra q half left out), 512
# experts of 512 top-10 and one shared, one MTP layer. Kimi-Linear-48B-A3B: 27 layers, 21 KDA (32 heads of 128,
# per-channel decay and output gate each through rank 128) and 6 MLA (32 heads, no q LoRA), the first dense.
# LongCat-Flash: 28 layers of two MLA + dense-FFN sublayers beside one MoE (512 experts of 2048 top-12, 256
# zero-computation ones), one MTP layer. Totals and active counts against the model cards in tests/planner
# (test_planner_hybrids.py).
MODELS["qwen3-next-80b-a3b"] = ModelShape(
    "qwen3-next-80b-a3b", num_layers=48, first_dense=0, hidden=2048, dense_intermediate=5632,
    attention=GQA(16, 2, 256), num_experts=512, num_shared=1, top_k=10, moe_intermediate=512, vocab=151936,
    mtp_layers=1, linear=LinearAttention(layers=36, num_heads=32, num_k_heads=16, head_k_dim=128, head_v_dim=128))
MODELS["kimi-linear-48b-a3b"] = ModelShape(
    "kimi-linear-48b-a3b", num_layers=27, first_dense=1, hidden=2304, dense_intermediate=9216,
    attention=MLA(32, 0, 512, 128, 64, 128), num_experts=256, num_shared=1, top_k=8, moe_intermediate=1024,
    vocab=163840, linear=LinearAttention(layers=21, num_heads=32, num_k_heads=32, head_k_dim=128, head_v_dim=128,
                                         gate_rank=128, decay_per_channel=True, decay_rank=128))
MODELS["longcat-flash"] = ModelShape(
    "longcat-flash", num_layers=28, first_dense=0, hidden=6144, dense_intermediate=12288,
    attention=MLA(64, 1536, 512, 128, 64, 128), num_experts=512, num_shared=0, top_k=12,
    moe_intermediate=2048, vocab=131072, mtp_layers=1, zero_experts=256, sublayers=2, dense_beside_moe=2)


def get_model(name: str) -> ModelShape:
    """Model by name; a ValueError lists the known names."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} is not known: choose from {', '.join(sorted(MODELS))}.")
    return MODELS[name]
