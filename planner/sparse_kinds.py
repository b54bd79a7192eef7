"""The 2026 kinds of the cluster model's shapes (planner/model_shape.ModelShape holds them): the indexed GQA layers
that read a selection of the context (block-sparse attention, MiniMax-M3; QSA, Qwen3.8-Flash-Next), hyper-connections
(several residual streams mixed around every block) and hashed n-gram embedding tables (Qwen3.8's PLE, the table
shape of DeepSeek-V4.1's Engram). Each as the engine lays it out: engine/models/block_sparse_config.py,
engine/models/qwen4_exp/reader.py (QSAIndexerConfig), engine/models/hyper_connections_config.py,
engine/models/ngram_embedding_config.py. Pure data and the arithmetic of each kind alone.
"""
from __future__ import annotations

from dataclasses import dataclass


def _positive(owner: str, **fields: int) -> None:
    for name, v in fields.items():
        if v < 1:
            raise ValueError(f"{owner} {name}={v} must be >= 1.")


@dataclass(frozen=True)
class BlockSparse:
    """Block-sparse attention on `layers` of a GQA model's attention layers (MiniMax-M3's minimax_m3_sparse ones).

    An indexer of `index_heads` heads of `index_head_dim` (one key per token, cached beside K and V) scores every
    earlier token, max-pools the scores over blocks of `block_size` tokens and each query attends to its
    `topk_blocks` best blocks (`local_blocks` of them its own and those before it, always kept): a decode step reads
    every cached index key but K and V of at most topk_blocks x block_size tokens. Each index head selects for a group
    of query heads; with as many index heads as kv heads (MiniMax-M3: 4 and 4) a kv head's reads are its group's
    selection, so the K / V read is the selection's tokens once per kv head."""

    layers: int
    index_heads: int
    index_head_dim: int
    block_size: int
    topk_blocks: int
    local_blocks: int = 1

    def __post_init__(self) -> None:
        _positive("BlockSparse", layers=self.layers, index_heads=self.index_heads, index_head_dim=self.index_head_dim,
                  block_size=self.block_size, topk_blocks=self.topk_blocks)
        if not 0 <= self.local_blocks <= self.topk_blocks:
            raise ValueError(f"BlockSparse local_blocks={self.local_blocks} must be in [0, topk_blocks="
                             f"{self.topk_blocks}].")

    def proj_params(self, hidden: int) -> int:
        """One layer's indexer: q (index_heads x index_head_dim) and k (index_head_dim) from hidden."""
        return hidden * (self.index_heads + 1) * self.index_head_dim

    def key_elems(self) -> int:
        """Index values one token caches per layer (the engine keeps them bf16 under an fp8 KV cache)."""
        return self.index_head_dim

    def selected(self, keys: float) -> float:
        """Tokens whose K and V one query reads."""
        return min(keys, self.topk_blocks * self.block_size)

    def work(self, keys: float, per_key_flops: float, kv_elems: float) -> tuple[float, float]:
        """(FLOPs per query token, cached elements read per sequence) of one layer: every index key scored (2 FLOPs a
        head and dim), attention over the selection."""
        sel = self.selected(keys)
        return (keys * 2 * self.index_heads * self.index_head_dim + sel * per_key_flops,
                keys * self.index_head_dim + sel * kv_elems)


@dataclass(frozen=True)
class QSA:
    """QSA on `layers` of a GQA model's attention layers (Qwen3.8-Flash-Next's indexed_attention ones).

    Per token an indexer projects `index_heads` queries and one raw key of `index_head_dim`; the raw key is cached, and
    the token completing a block of `compress_ratio` writes the block's pooled key into a row of its own: 2 x
    index_head_dim values per token beside K and V (the engine's layout, engine/models/qwen4_exp/qsa.py). A decode step
    reads the complete blocks' keys only (keys / compress_ratio rows), scores them and attends to the tokens of the
    budget / compress_ratio best blocks plus its own incomplete block: at most budget + compress_ratio - 1 tokens."""

    layers: int
    index_heads: int
    index_head_dim: int
    budget: int
    compress_ratio: int

    def __post_init__(self) -> None:
        _positive("QSA", layers=self.layers, index_heads=self.index_heads, index_head_dim=self.index_head_dim,
                  budget=self.budget, compress_ratio=self.compress_ratio)
        if self.budget % self.compress_ratio:
            raise ValueError(f"QSA budget={self.budget} must be a multiple of compress_ratio={self.compress_ratio}.")

    def proj_params(self, hidden: int) -> int:
        """One layer's index_qk_proj: (index_heads + 1) x index_head_dim rows from hidden."""
        return hidden * (self.index_heads + 1) * self.index_head_dim

    def key_elems(self) -> int:
        """The raw key row and the block key row, per token and layer."""
        return 2 * self.index_head_dim

    def selected(self, keys: float) -> float:
        return min(keys, self.budget + self.compress_ratio - 1)

    def work(self, keys: float, per_key_flops: float, kv_elems: float) -> tuple[float, float]:
        """As BlockSparse.work, over keys / compress_ratio block keys."""
        blocks, sel = keys / self.compress_ratio, self.selected(keys)
        return (blocks * 2 * self.index_heads * self.index_head_dim + sel * per_key_flops,
                blocks * self.index_head_dim + sel * kv_elems)


HC_FORMS = ("mhc", "independent", "gated")


@dataclass(frozen=True)
class HyperConnections:
    """`streams` residual streams around each of a layer's two blocks (attention, FFN) and a mix before the LM head.
    Weights per block, by form (transformers 5.24's modules):
    - "mhc" (DeepSeek-V4, GLM-5.3-Flash): fn [(2 + n) n, n hidden] (pre, post and the n x n mixing); the head a mean;
    - "independent" (Hunyuan Hy4's iHC): fn [2 n, n hidden], no mixing matrix; the head's fn [n, n hidden];
    - "gated" (Qwen3.8-Flash-Next): a low-rank mixer, down [rank, n hidden] and up [n hidden, rank], and the block
      injection [n, n hidden]; the head's mixer down and up.
    Held in float32 (the engine keeps them so; a few million weights). Every token touches all of them. What they add
    in time (n x the residual's element-wise traffic) is left out: small beside the GEMMs."""

    streams: int
    form: str
    rank: int = 0

    def __post_init__(self) -> None:
        if self.streams < 2 or self.form not in HC_FORMS or (self.form == "gated") != (self.rank > 0):
            raise ValueError(f"HyperConnections streams={self.streams}, form={self.form!r}, rank={self.rank}: streams "
                             f">= 2, form one of {', '.join(HC_FORMS)}, a rank > 0 for 'gated' only.")

    def matrices(self, hidden: int, num_layers: int) -> list[tuple[int, int, int]]:
        """(rows, columns, count) of every matrix: two blocks per layer, and the head's."""
        n, wide, blocks = self.streams, self.streams * hidden, 2 * num_layers
        if self.form == "mhc":
            return [((2 + n) * n, wide, blocks)]
        if self.form == "independent":
            return [(2 * n, wide, blocks), (n, wide, 1)]
        return [(self.rank, wide, blocks + 1), (wide, self.rank, blocks + 1), (n, wide, blocks)]

    def params(self, hidden: int, num_layers: int) -> int:
        return sum(r * c * k for r, c, k in self.matrices(hidden, num_layers))


NGRAM_PLACEMENTS = ("device", "host")


@dataclass(frozen=True)
class NgramTables:
    """Hashed n-gram embedding tables before `layers` of the decoder layers (Qwen3.8-Flash-Next's PLE,
    engine/models/ngram_embedding_config.py). Per layer (ngram_size - 1) x heads_per_ngram heads, each a table of about
    `vocab_base` rows (the first primes above it) of embed_dim / heads values: vocab_base x embed_dim weights a layer
    (20,000,000 x 2048 = 41B for Qwen3.8's defaults). A token reads one row per head (embed_dim values a layer, a
    lookup like the embedding's), then the key and value projections (embed_dim to `key_out`, to hidden) run.

    `placement` (the engine's field): "device" holds the tables beside the other weights, every rank a copy
    (attention DP); "host" keeps them in host memory, the looked-up rows copied to the device: embed_dim x 2 bytes
    per token and layer over the host link, none of the tables in HBM. Per sequence and layer the engine keeps the
    last ngram_size - 1 token ids and its dilated convolution's last (conv_kernel - 1) x ngram_size rows of key_out
    channels (engine/models/qwen4_exp/ple.py): state_bytes."""

    layers: int
    ngram_size: int
    heads_per_ngram: int
    vocab_base: int
    embed_dim: int
    key_out: int
    placement: str = "host"
    conv_kernel: int = 4

    def __post_init__(self) -> None:
        _positive("NgramTables", layers=self.layers, heads_per_ngram=self.heads_per_ngram,
                  vocab_base=self.vocab_base, embed_dim=self.embed_dim, key_out=self.key_out)
        if self.ngram_size < 2 or self.placement not in NGRAM_PLACEMENTS:
            raise ValueError(f"NgramTables ngram_size={self.ngram_size} must be >= 2 and placement="
                             f"{self.placement!r} one of {', '.join(NGRAM_PLACEMENTS)}.")
        if self.embed_dim % self.heads:
            raise ValueError(f"NgramTables embed_dim={self.embed_dim} must be a multiple of its {self.heads} heads.")

    @property
    def heads(self) -> int:
        return (self.ngram_size - 1) * self.heads_per_ngram

    def table_params(self) -> int:
        """Every layer's tables: heads x vocab_base rows of embed_dim / heads."""
        return self.layers * self.vocab_base * self.embed_dim

    def proj_params(self, hidden: int) -> int:
        """Every layer's key and value projections."""
        return self.layers * self.embed_dim * (self.key_out + hidden)

    def state_bytes(self, elem_bytes: float = 2.0) -> float:
        """Every layer's per-sequence state: the conv rows (model dtype) and the int64 token ids."""
        rows = (self.conv_kernel - 1) * self.ngram_size
        return self.layers * (rows * self.key_out * elem_bytes + (self.ngram_size - 1) * 8)

    def host_bytes_per_token(self, elem_bytes: float = 2.0) -> float:
        """Bytes one token's lookups copy from host memory (placement "host"; 0 on the device)."""
        return self.layers * self.embed_dim * elem_bytes if self.placement == "host" else 0.0
