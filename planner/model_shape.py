"""A MoE decoder's shape for the cluster model (planner/models.py holds the rows).

Counts only what decides time: parameters touched per token (per layer kind),
attention FLOPs per (query, key) pair and KV bytes per cached token.
"""
from __future__ import annotations

from dataclasses import dataclass

from .attention_kinds import DSA, GQA, MLA, CompressedMQA, LinearAttention, SlidingWindow
from .sparse_kinds import QSA, BlockSparse, HyperConnections, NgramTables


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
    indexer: a GQA model's indexed layers (BlockSparse: MiniMax-M3; QSA: Qwen3.8-Flash-Next), `indexer.layers` of
    its full-attention layers. hyper / ngram: hyper-connections and n-gram tables (planner/sparse_kinds.py).
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
    indexer: BlockSparse | QSA | None = None
    hyper: HyperConnections | None = None
    ngram: NgramTables | None = None

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
        if self.indexer and (not isinstance(self.attention, GQA)
                             or self.indexer.layers > self.attention_blocks - other):
            raise ValueError(f"model {self.name}: indexer layers={self.indexer.layers} need GQA attention and at most "
                             f"its {self.attention_blocks - other} full-attention layers.")
        if self.dsa and self.dsa.shared_layers >= self.attention_blocks - other:
            raise ValueError(f"model {self.name}: dsa shared_layers={self.dsa.shared_layers} must leave a full "
                             f"indexer among its {self.attention_blocks - other} DSA layers.")
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
        ix = self.indexer.layers * self.indexer.proj_params(self.hidden) if self.indexer else 0
        return (self.kv_attention_layers * self._attention_proj_params() + lin + ix
                + self._sliding_extra_kv_rows() * self.hidden) / self.num_layers

    def _sliding_extra_kv_rows(self) -> int:
        """k / v projection rows the sliding layers have beyond the full layers' (their own kv heads), all of them."""
        a, w = self.attention, self.sliding
        if not (w and w.num_kv_heads and isinstance(a, GQA)):
            return 0
        return w.layers * (w.num_kv_heads - a.num_kv_heads) * (a.head_dim + a.v_dim)

    def _sliding_kv_scale(self) -> float:
        """A sliding layer's cached values per token over a full layer's."""
        a, w = self.attention, self.sliding
        return w.num_kv_heads / a.num_kv_heads if w and w.num_kv_heads and isinstance(a, GQA) else 1.0

    def _own_index_fraction(self) -> float:
        """Of the DSA layers, the share with an indexer of their own (not "shared")."""
        full = self.full_attention_layers
        return (full - self.dsa.shared_layers) / full if self.dsa else 0.0

    def extra_params(self) -> float:
        """Weights every token touches beyond the layers' attention and FFNs: hyper-connections, the n-gram layers'
        projections (not their tables: ngram_table_params)."""
        hc = self.hyper.params(self.hidden, self.num_layers) if self.hyper else 0
        return hc + (self.ngram.proj_params(self.hidden) if self.ngram else 0)

    def ngram_table_params(self) -> float:
        return self.ngram.table_params() if self.ngram else 0.0

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
                     + (d.index_head_dim * h if d.kpool > 1 else 0) if d else 0)  # wq_b, wk, weights_proj, pool gate
            return q + kv_a + kv_b + a.num_heads * a.v_dim * h + index * self._own_index_fraction() + h * a.gate_out
        if isinstance(a, CompressedMQA):  # the mean over the layers: compressors and indexers on some only
            H, I, NH = a.head_dim, a.index_head_dim, a.num_heads * a.head_dim
            base = h * a.q_lora_rank + a.q_lora_rank * NH + h * H + NH * a.o_lora_rank + a.o_groups * a.o_lora_rank * h
            csa = 4 * h * H + a.q_lora_rank * a.index_heads * I + h * a.index_heads + 4 * h * I
            return base + (a.csa_layers * csa + a.hca_layers * 2 * h * H) / a.layers
        q = a.num_heads * a.head_dim * (2 if a.gate else 1)
        return h * (q + a.num_kv_heads * (a.head_dim + a.v_dim)) + a.num_heads * a.v_dim * h

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
            if a.gate_out:
                out.append(("attn", a.gate_out, h, L))
            if self.dsa:  # the indexer's wq_b and wk (FP8 as published), weights_proj (float: "kv_b"'s format)
                d, own = self.dsa, L - self.dsa.shared_layers
                out += [("attn", d.index_heads * d.index_head_dim, a.q_lora_rank, own),
                        ("attn", d.index_head_dim * (2 if d.kpool > 1 else 1), h, own), ("kv_b", d.index_heads, h, own)]
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
            q = a.num_heads * a.head_dim * (2 if a.gate else 1)
            out = [("attn", q + a.num_kv_heads * (a.head_dim + a.v_dim), h, L), ("attn", h, a.num_heads * a.v_dim, L)]
            if self.indexer:
                ix = self.indexer
                out.append(("attn", (ix.index_heads + 1) * ix.index_head_dim, h, ix.layers))
            if self._sliding_extra_kv_rows():  # the sliding layers' extra kv heads
                out.append(("attn", self._sliding_extra_kv_rows(), h, 1))
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
        if self.hyper:  # "hc": float32
            out += [("hc", r, c, n) for r, c, n in self.hyper.matrices(h, self.num_layers)]
        if self.ngram:  # the projections as the other projections; the tables only when held on the device
            g = self.ngram
            out += [("attn", g.key_out + h, g.embed_dim, g.layers)]
            if g.placement == "device":
                out.append(("ngram", g.vocab_base * g.heads, g.embed_dim // g.heads, g.layers))
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
        if isinstance(a, GQA):
            return 2 * a.num_heads * (a.head_dim + a.v_dim)
        return 4 * a.num_heads * a.head_dim  # V4's MQA (QK and PV over head_dim, every head)

    def kv_elems_per_token(self) -> float:
        """Cached elements per token of context per layer, the mean over the layers: the full-context attention
        blocks' (MLA: latent + rope key, and DSA's indexer key; GQA: K and V); linear and sliding layers keep state
        instead (state_bytes_per_sequence)."""
        index = 0.0
        if self.dsa:
            index = (self.full_attention_layers - self.dsa.shared_layers) * self.dsa.key_elems
        elif self.indexer:
            index = self.indexer.layers * self.indexer.key_elems()
        return (self._kv_elems_per_block() * self.full_attention_layers + index) / self.num_layers

    def _kv_elems_per_block(self) -> float:
        """Cached elements per token of one `attention` block."""
        a = self.attention
        if isinstance(a, MLA):  # (a DSA indexer's key: kv_elems_per_token)
            return a.kv_lora_rank + a.qk_rope_dim
        if isinstance(a, CompressedMQA):  # paged per token of context, the mean over the layers (the window is state)
            return (a.csa_layers * (a.head_dim + a.index_head_dim) / a.csa_rate
                    + a.hca_layers * a.head_dim / a.hca_rate) / a.layers
        return a.num_kv_heads * (a.head_dim + a.v_dim)

    def state_bytes_per_sequence(self, kv_bytes: float) -> float:
        """Bytes each sequence keeps whatever its length (DeepSeek-V4: every layer's window of raw KV at `kv_bytes`
        per value, and the compressors' running kv and gate rows in float32, as the engine keeps them: CSA 2 x rate
        tokens of 4 x head_dim and its indexer's of 4 x index_head_dim, HCA rate tokens of 2 x head_dim); 0 for
        linear-attention layers their state (LinearAttention.state_bytes), sliding layers their window of KV at
        `kv_bytes`; 0 for every other model."""
        a = self.attention
        if not isinstance(a, CompressedMQA):
            lin = self.linear.layers * self.linear.state_bytes() if self.linear else 0.0
            win = (self.sliding.layers * self.sliding.window * self._kv_elems_per_block() * self._sliding_kv_scale()
                   * kv_bytes if self.sliding else 0.0)
            return lin + win + (self.ngram.state_bytes() if self.ngram else 0.0)
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
        dense = self.full_attention_layers - (self.indexer.layers if self.indexer else 0)
        flops, elems = dense * full_f, dense * full_e
        if self.indexer:  # the indexed layers: every index key (or block key) scored, the selection read
            ix_f, ix_e = self.indexer.work(keys, self.attn_flops_per_key(decode), self._kv_elems_per_block())
            flops, elems = flops + self.indexer.layers * ix_f, elems + self.indexer.layers * ix_e
        if self.sliding:
            win_f, win_e = self._block_attention_work(min(keys, self.sliding.window), decode)
            flops, elems = (flops + self.sliding.layers * win_f,
                            elems + self.sliding.layers * win_e * self._sliding_kv_scale())
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
        # Pooled (GLM-5.3): every token's [key | gate] row read, one pooled key per kpool scored, topk + kpool - 1
        # positions attended. Shared layers (their mean share) score nothing and read no index key.
        sel, own = min(keys, d.width), self._own_index_fraction()
        flops = sel * self.attn_flops_per_key(decode) + own * keys / d.kpool * 2 * d.index_heads * d.index_head_dim
        return flops, sel * self._kv_elems_per_block() + own * keys * d.key_elems

    def total_params(self) -> float:
        """All weights (embedding and LM head counted once each); for memory checks."""
        per_attn = self.attn_proj_params()
        moe = ((self.num_experts + self.num_shared) * self.expert_params()
               + self.hidden * (self.num_experts + self.zero_experts))
        return (self.num_layers * per_attn + (self.first_dense + self.dense_beside_moe * self.moe_layers)
                * self.dense_ffn_params() + self.moe_layers * moe + 2 * self.vocab * self.hidden
                + self.extra_params() + self.ngram_table_params())

    def active_params(self) -> float:
        """Weights one token touches: every layer's attention (and dense FFNs), routed_top_k routed and the shared
        experts of each MoE layer, the LM head (the embedding row is a lookup)."""
        return (self.num_layers * self.attn_proj_params()
                + (self.first_dense + self.dense_beside_moe * self.moe_layers) * self.dense_ffn_params()
                + self.moe_layers * (self.routed_top_k + self.num_shared) * self.expert_params()
                + self.vocab * self.hidden + self.extra_params())
