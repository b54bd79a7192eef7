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
class ModelShape:
    """A MoE decoder. Dense layers come first (`first_dense` of them, intermediate `dense_intermediate`).

    n_group/topk_group: group-limited routing (DeepSeek-V3: 8/4); 1/1 means none.
    mtp_layers: multi-token-prediction modules shipped with the checkpoint (each one decoder layer).
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

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense

    @property
    def is_mla(self) -> bool:
        return isinstance(self.attention, MLA)

    def attn_proj_params(self) -> int:
        """Weights of the attention projections of one layer (both MLA forms touch the same count)."""
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
        a, h, L = self.attention, self.hidden, self.num_layers
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
        di, mi = self.dense_intermediate, self.moe_intermediate
        out += [("dense", 2 * di, h, self.first_dense), ("dense", h, di, self.first_dense),
                ("shared", 2 * mi * self.num_shared, h, self.moe_layers), ("shared", h, mi * self.num_shared, self.moe_layers),
                ("expert", 2 * mi, h, self.moe_layers * self.num_experts), ("expert", h, mi, self.moe_layers * self.num_experts),
                ("router", self.num_experts, h, self.moe_layers), ("embed", self.vocab, h, 2)]
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

    def kv_elems_per_token(self) -> int:
        """Cached elements per token per layer (MLA: latent + rope key, and DSA's indexer key; GQA: K and V)."""
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
        every other model."""
        a = self.attention
        if not isinstance(a, CompressedMQA):
            return 0.0
        H, I = a.head_dim, a.index_head_dim
        rows = a.csa_layers * 2 * a.csa_rate * (4 * H + 4 * I) + a.hca_layers * a.hca_rate * 2 * H
        return a.layers * a.window * H * kv_bytes + rows * 4

    def attention_work(self, keys: float, decode: bool) -> tuple[float, float]:
        """(FLOPs per query token, cached elements read per sequence) of one layer's attention over `keys` cached
        tokens. Dense: every key, all its elements. DSA: the indexer scores every key (its index key read; H heads
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
            return keys * self.attn_flops_per_key(decode), keys * self.kv_elems_per_token()
        a = self.attention
        sel = min(keys, d.topk)
        flops = sel * self.attn_flops_per_key(decode) + keys * 2 * d.index_heads * d.index_head_dim
        return flops, sel * (a.kv_lora_rank + a.qk_rope_dim) + keys * d.index_head_dim

    def total_params(self) -> float:
        """All weights (embedding and LM head counted once each); for memory checks."""
        per_attn = self.attn_proj_params()
        moe = (self.num_experts + self.num_shared) * self.expert_params() + self.hidden * self.num_experts
        return (self.num_layers * per_attn + self.first_dense * self.dense_ffn_params()
                + self.moe_layers * moe + 2 * self.vocab * self.hidden)


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

def get_model(name: str) -> ModelShape:
    """Model by name; a ValueError lists the known names."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} is not known: choose from {', '.join(sorted(MODELS))}.")
    return MODELS[name]
