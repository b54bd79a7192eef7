"""Qwen3.8-Flash-Next's config reader (transformers' qwen4_exp: the text model, Qwen4ExpTextConfig), and the layer
configs it makes: QSA attention (IndexedGQAConfig: gated GQA whose queries read the blocks a token indexer picks) and
the gated DeltaNet layers that carry a PLE block (PLELinearConfig: gated DeltaNet's states plus the PLE's).

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from moelink.moe.router_config import RouterConfig

from ..hyper_connections_config import HyperConnectionConfig
from ..gqa_config import GQAConfig
from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ..gated_deltanet_config import LinearAttentionConfig
from ..ngram_embedding_config import NGramEmbeddingConfig
from ...config.reader_parts import MAX_WIDTH, layer_kinds, rope_config, rotary_dim

_LAYER_TYPES = ("linear_attention", "indexed_attention")
# The most each may be (engine/models/gated_deltanet_config.py's LINEAR_BOUNDS say why).
QSA_BOUNDS = {"indexer_n_heads": 1 << 10, "indexer_head_dim": 1 << 12, "indexer_budget": 1 << 20,
              "indexer_compress_ratio": 1 << 12, "ple_conv_kernel_size": 64, "split_ngram_parts": 1 << 16}


def _bounded(name: str, v) -> int:
    most = QSA_BOUNDS[name]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most:
        raise unsupported(name, v, f"an integer in [1, {most}]")
    return v


@dataclass(frozen=True)
class QSAIndexerConfig:
    """The QSA token indexer of one attention layer (transformers' Qwen4ExpTextQSAIndexer): per token one raw key
    (index_qk_proj's last head, cached beside K/V on the same blocks); query t scores each complete block of
    `compress_ratio` earlier tokens, block b's key = rope(RMSNorm(mean of its raw keys)) at the block's first position,
        score[t, b] = sum_h relu(q[t, h] . key_b) / sqrt(head_dim)        (float32)
    and attends to the tokens of its `budget / compress_ratio` best blocks plus the tokens of its incomplete last block."""

    num_heads: int
    head_dim: int
    budget: int
    compress_ratio: int

    def __post_init__(self) -> None:
        for name, v in (("indexer_n_heads", self.num_heads), ("indexer_head_dim", self.head_dim),
                        ("indexer_budget", self.budget), ("indexer_compress_ratio", self.compress_ratio)):
            _bounded(name, v)
        if self.budget % self.compress_ratio:
            raise unsupported("indexer_budget", self.budget, f"a multiple of indexer_compress_ratio="
                                                             f"{self.compress_ratio}")

    @property
    def block_topk(self) -> int:
        return self.budget // self.compress_ratio

    @property
    def max_selected(self) -> int:
        """Tokens one query attends to at most: its blocks' and its incomplete block's."""
        return self.budget + self.compress_ratio - 1


@dataclass(frozen=True)
class IndexedGQAConfig(GQAConfig):
    """Gated GQA (Qwen3.5's full attention) with a QSA indexer (`indexer`); its cache: K, V, the indexer's raw
    keys and the complete blocks' keys, one row of head_dim values per token each, on the same block ids."""

    kind: ClassVar[str] = "qsa"
    indexer: QSAIndexerConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.indexer is None:
            raise ValueError("IndexedGQAConfig needs its indexer (config.json indexer_* fields).")
        if self.rope.rotary_dim > self.indexer.head_dim:
            raise unsupported("indexer_head_dim", self.indexer.head_dim, f"at least the attention's rotary width "
                                                                         f"{self.rope.rotary_dim}")

    def kv_layer_pairs(self, num_layers: int) -> None:
        return None

    def cache_shapes(self, num_blocks: int, block_size: int,
                     cache_dtype: torch.dtype | None = None) -> tuple[tuple[int, ...], ...]:
        """(k_cache_BLKH, v_cache_BLKH, index_cache_BLI, block_keys_BLI): beside K and V the indexer's raw keys, and
        each complete block's key (pooled, normed, roped) at the row of the block's last token."""
        assert self.indexer is not None
        index = (num_blocks + 1, block_size, self.indexer.head_dim)
        return (*super().cache_shapes(num_blocks, block_size, cache_dtype), index, index)

    def cache_dtypes(self, cache_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        return cache_dtype, cache_dtype, cache_dtype, cache_dtype

    def kv_values_per_token(self) -> int:
        assert self.indexer is not None
        return super().kv_values_per_token() + 2 * self.indexer.head_dim


@dataclass(frozen=True)
class PLEConfig:
    """A layer's Per-Layer Embedding (transformers' Qwen4ExpTextPLELayer): its n-gram table, and the dilated
    depthwise convolution (kernel `conv_kernel`, dilation ngram_size) over hc_count * hidden channels, whose state
    is the last (conv_kernel - 1) * dilation rows."""

    ngram: NGramEmbeddingConfig
    channels: int  # hc_count * hidden_size
    conv_kernel: int
    shards: int  # split_ngram_parts: the table's checkpoint shards

    @property
    def dilation(self) -> int:
        return self.ngram.ngram_size

    @property
    def conv_rows(self) -> int:
        return (self.conv_kernel - 1) * self.dilation


@dataclass(frozen=True)
class PLELinearConfig(LinearAttentionConfig):
    """A gated DeltaNet layer with a PLE block before it: its state pools are gated DeltaNet's two, then the PLE's
    conv rows [P, conv_rows, channels] (model dtype) and n-gram context [P, ngram_size - 1] (int64 ids)."""

    ple: PLEConfig | None = None

    def state_shapes(self, num_slots: int) -> tuple[tuple[int, ...], ...]:  # type: ignore[override]
        base = super().state_shapes(num_slots)
        if self.ple is None:
            return base
        return (*base, (num_slots + 1, self.ple.conv_rows, self.ple.channels),
                (num_slots + 1, self.ple.ngram.context_len))

    def state_dtypes(self, dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        return (dtype, torch.float32) + ((dtype, torch.long) if self.ple is not None else ())

    def state_bytes_per_sequence(self, dtype: torch.dtype) -> int:
        base = super().state_bytes_per_sequence(dtype)
        if self.ple is None:
            return base
        return base + self.ple.conv_rows * self.ple.channels * dtype.itemsize + 8 * self.ple.ngram.context_len


def _eos(hf) -> int | None:
    eos = getattr(hf, "eos_token_id", None)
    return eos[0] if isinstance(eos, (list, tuple)) and eos else eos


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Qwen3.8-Flash-Next's text model as transformers 5.24 builds it (Qwen4ExpTextModel): layer_types names each
    layer gated DeltaNet ("linear_attention", split projections as Qwen3.5) or QSA ("indexed_attention": Qwen3.5's
    gated attention, q/k norms, partial rotary, reading the blocks its indexer picks); hc_count residual streams
    with gated hyper-connections (hc_lowrank) around every block and a mixer before the LM head (no final norm); PLE
    n-gram tables before the gated DeltaNet of ple_layer_ids (1-indexed); Qwen3-Next's MoE block (softmax top-k,
    a shared expert behind a sigmoid gate) on every layer; norms zero-centred (weight + 1)."""
    layer_types = layer_kinds(hf, "layer_types", _LAYER_TYPES, c["num_layers"])
    if "indexed_attention" not in layer_types:
        raise unsupported("layer_types", list(layer_types), "at least one 'indexed_attention' layer")
    if getattr(hf, "attention_bias", False):
        raise unsupported("attention_bias", True, (False,), f" for {arch}")
    # gated DeltaNet's output gate (LinearAttentionConfig refuses what it does not run, naming the field)
    gate_act = getattr(hf, "output_gate_type", None) or getattr(hf, "hidden_act", "silu")
    fields = {name: getattr(hf, name, None) for name in ("indexer_n_heads", "indexer_kv_heads", "indexer_head_dim",
                                                         "indexer_budget", "indexer_compress_ratio")}
    missing = [name for name, v in fields.items() if v is None]
    if missing:
        raise unsupported(missing[0], None, "a positive integer (QSA on the indexed_attention layers)")
    if fields["indexer_kv_heads"] != 1:
        raise unsupported("indexer_kv_heads", fields["indexer_kv_heads"], (1,))
    indexer = QSAIndexerConfig(fields["indexer_n_heads"], fields["indexer_head_dim"], fields["indexer_budget"],
                               fields["indexer_compress_ratio"])
    factor = float(rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0))
    full = IndexedGQAConfig(c["num_heads"], c["num_kv_heads"], c["head_dim"],
                            rope_config(rope, c, rotary_dim(c["head_dim"], factor)), qk_norm="per_head",
                            output_gate=True, indexer=indexer)
    hc = HyperConnectionConfig(int(hf.hc_count), 1, 1e-6, mixing="gated", lowrank=hf.hc_lowrank)
    ple_ids = sorted(set(getattr(hf, "ple_layer_ids", None) or []))
    bad = [i for i in ple_ids if not (isinstance(i, int) and 1 <= i <= c["num_layers"])
           or layer_types[i - 1] != "linear_attention"]
    if bad:
        raise unsupported("ple_layer_ids", ple_ids, f"1-indexed ids of linear_attention layers in [1, "
                                                    f"{c['num_layers']}]")
    la = dict(num_k_heads=int(hf.linear_num_key_heads), num_v_heads=int(hf.linear_num_value_heads),
              head_k_dim=int(hf.linear_key_head_dim), head_v_dim=int(hf.linear_value_head_dim),
              conv_kernel=int(hf.linear_conv_kernel_dim), projection="split", output_gate_act=gate_act)
    linear = PLELinearConfig(**la)
    layers: list = [full if t == "indexed_attention" else linear for t in layer_types]
    if ple_ids:
        eos = _eos(hf)
        if eos is None:
            raise unsupported("eos_token_id", None, "a token id (PLE's n-grams restart after it)")
        kernel = _bounded("ple_conv_kernel_size", getattr(hf, "ple_conv_kernel_size", 4))
        shards = _bounded("split_ngram_parts", getattr(hf, "split_ngram_parts", 1))
        for table, i in enumerate(ple_ids):
            ngram = NGramEmbeddingConfig(c["vocab_size"], int(hf.ngram_size), int(hf.heads_per_ngram),
                                         int(hf.ple_embed_dim or c["hidden_size"]), int(hf.ngram_vocab_size_base),
                                         int(hf.make_ngram_vocab_size_divisible_by), int(hf.seed), int(eos), table)
            layers[i - 1] = PLELinearConfig(**la, ple=PLEConfig(ngram, hc.hc_mult * c["hidden_size"], kernel,
                                                                shards))
    E = int(hf.num_experts)
    shared = getattr(hf, "shared_expert_intermediate_size", 0)
    if isinstance(shared, bool) or not isinstance(shared, int) or not 1 <= shared <= MAX_WIDTH:
        raise unsupported("shared_expert_intermediate_size", shared, f"an integer in [1, {MAX_WIDTH}]")
    norm = bool(getattr(hf, "norm_topk_prob", True))
    moe = MoEConfig(RouterConfig(E, c["top_k"], norm_topk_prob=norm), n_shared_experts=1,
                    shared_expert_intermediate_size=shared, shared_expert_gate=True)
    return dict(num_experts=E, moe_intermediate_size=int(hf.moe_intermediate_size), intermediate_size=0,
                norm_topk_prob=norm, sparse_layers=tuple(range(c["num_layers"])), moe=moe, attention=full,
                layer_attention=tuple(layers), norm_weight_offset=1.0, hyper_connections=hc)


__all__ = ["IndexedGQAConfig", "PLEConfig", "PLELinearConfig", "QSAIndexerConfig", "read"]
