"""Compressed-KV attention as config (issue 45; DeepSeek-V4 runs it, engine/models/deepseek_v4/ reads its config.json
into these): one config per layer, its cache layout (shapes, dtypes, bytes) and its per-sequence state. Pure data: no
model code, no device.

Attention (`CompressedAttentionConfig`, kind "compressed"): every layer is multi-query attention with one shared KV head
that is its own value (K = V), per-head sinks, and a sliding window over the raw recent tokens; a compressed layer adds
entries that summarise `compress_rate` tokens each: compressed sparse attention (CSA, rate 4 in V4: overlapping windows
of 2 * rate, a lightning indexer picks `index_topk` entries per query) or heavily compressed attention (HCA, rate 128:
read densely). Sliding-only layers rotate with the "main" rope, compressed layers (and their compressor and indexer)
with the "compress" rope. The output is a grouped low-rank projection (o_groups, o_lora_rank).

The cache of a layer (engine/models/deepseek_v4/attention.py computes it, engine/rank runs it):
- paged, on the sequence's block ids: the compressed entries, `block_size / compress_rate` per block (an entry never
  straddles blocks: the engine's block size must be a multiple of every compress rate), and under CSA the indexer's
  keys over the same entries. What one token costs there: (head_dim [+ index_head_dim]) / compress_rate values.
- per sequence, in a state slot of the hybrid cache manager (scheduler/hybrid_cache.py), whose checkpoints at block
  boundaries make prefix caching and preemption exact: the window's raw KV (the last `sliding_window` tokens, a ring
  indexed by position mod window) and the compressors' running rows (each recent token's projected kv and gate, a
  ring of `compress_rate` tokens, `2 * compress_rate` under CSA whose entry reads the previous window too; the
  indexer's compressor the same at index_head_dim), in float32 (`state_dtypes`).
Under --kv-cache-dtype fp8 (float8_e4m3fn; e5m2 is not offered) the paged tensors hold fp8 rows as bytes (uint8 [B, Lc,
X], `fp8_row_bytes`; kernels/compressed_attention.FP8Rows encodes them): an entry's leading H - R values in e4m3 with a
float32 scale per 64 and its R rope values in bfloat16 (FlashMLA's shape, with float32 scales), an index key in e4m3
with a float32 scale per 128 (DSA's row). V4-Flash's CSA layer: (604 + 132) / 4 = 184 bytes per token where bf16 costs
(1024 + 256) / 4 = 320. The window ring takes the entry's fp8 rows too: the layer's config carries the cache dtype
(`cache_dtype`, set by `resolve_compressed_cache`, which ModelConfig calls as it resolves DSA's key layout: the state
pools are allocated and sized from the layer config and the model dtype alone, engine/state/cache.py and
engine/config/kv_sizing.py); the compressor rows stay float32 (a partial window's running sums, not cached values).
Why the window is state and not paged: paged, the raw KV of every token would stay (head_dim values per token and
layer, as many as DeepSeek-V3's latent) unless the blocks leaving the window were freed, and the hybrid cache manager
does not combine a sliding-window block table with its state slots (scheduler/hybrid_cache.py refuses one); a ring
of W tokens costs what W tokens of paged KV cost, and its checkpoint at a block boundary keeps prefix hits exact.
The compressor rows are state for the same reason: they are a partly filled window (and CSA's overlap).

Legend: P state slots (the null slot included), B blocks (the null block included), L block size, H head_dim,
I index_head_dim, W sliding window, m compress rate.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .rope_config import RopeConfig
from ..config.refusals import unsupported

# config.json layer_types values and the compressor each one runs.
LAYER_KINDS = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
               "heavily_compressed_attention": "hca"}


# The most each size may be, checked as config.json is read, before anything is sized from it: the window ring, the
# compressor rings, the index top-k's selection are all allocated (or looped over) from these alone
# (engine/models/hyper_connections_config.py bounds the hyper-connection streams alike). Each bound is the largest published
# value (DeepSeek-V4-Flash / V4-Pro, transformers' DeepseekV4Config defaults) times a margin of 8 or more, and far below
# what a typo or a hostile file asks for (1e9 of them: a hang or a terabyte allocation).
ATTENTION_BOUNDS = {
    "sliding_window": 1 << 16,  # published 128: a ring of that many raw KV rows per sequence and layer (state slot)
    "compress_rates": 1 << 12,  # published 4 (CSA) and 128 (HCA): a ring of rate (CSA: 2 x rate) rows per sequence
    "index_topk": 1 << 15,  # published 512 (Flash) and 1024 (Pro), 2048 in DeepSeek-V3.2's DSA: a top-k per query
    "index_n_heads": 1 << 10,  # published 64
    "index_head_dim": 1 << 12,  # published 128 (head_dim's own bound, engine/config/model.py)
    "q_lora_rank": 1 << 16,  # published 1024 (Flash) and 1536 (Pro)
    "o_lora_rank": 1 << 16,  # published 1024
    "o_groups": 1 << 12,  # published 8 and 16; a divisor of num_attention_heads (itself at most 4096)
}


def positive_int(name: str, v, bounds: dict[str, int] = ATTENTION_BOUNDS) -> None:
    """A positive integer, at most bounds[name] where it has one; else one error naming the config.json field."""
    most = bounds.get(name.split(".")[0])  # compress_rates.<layer type>: compress_rates' bound
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (most is not None and v > most):
        raise unsupported(name, v, "a positive integer" + (f" at most {most}" if most is not None else ""))


# The fp8 rows' geometry (module docstring), in bytes: the config sizes the cache from it,
# kernels/compressed_attention.FP8Rows encodes and decodes the same layout (the config layer imports no kernel:
# DeepSeek-V4's fp8 KV tests, test_kv_sizing_bytes_per_token_fp8_beside_bf16, keep the two equal). Values per float32
# scale: an entry's (and window row's), an index key's (DSA's row).
ENTRY_SCALE_GROUP = 64
INDEX_SCALE_GROUP = 128


def fp8_row_bytes(dim: int, rope: int, group: int) -> int:
    """One row's bytes: the leading dim - rope values e4m3 (padded to 4 bytes), a float32 scale per `group` of them,
    the trailing `rope` values bfloat16, the row padded to 4 bytes."""
    nope = dim - rope
    return -(-(-(-nope // 4) * 4 + 4 * -(-nope // group) + 2 * rope) // 4) * 4


@dataclass(frozen=True)
class CompressedAttentionConfig:
    """One compressed-attention layer (module docstring)."""

    kind: ClassVar[str] = "compressed"
    layer_kind: str  # "sliding", "csa" or "hca"
    num_heads: int
    head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    rope: RopeConfig  # the trailing rope.rotary_dim dims of each head, pairs (2i, 2i + 1)
    compress_rate: int = 0  # 0 for a sliding-only layer
    index_n_heads: int = 0  # CSA's lightning indexer (0 elsewhere)
    index_head_dim: int = 0
    index_topk: int = 0
    rms_norm_eps: float = 1e-6
    # The KV cache's dtype, resolved (resolve_compressed_cache): float8_e4m3fn puts the window ring in fp8 rows as well
    # as the paged tensors; None (as config.json is read) keeps the window in the model dtype.
    cache_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        self._fp8(self.cache_dtype)  # e5m2 refused here, naming it
        if self.layer_kind not in LAYER_KINDS.values():
            raise unsupported("layer_types", self.layer_kind, tuple(LAYER_KINDS))
        for name in ("num_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window"):
            positive_int(name, getattr(self, name))
        if self.num_heads % self.o_groups:
            raise unsupported("o_groups", self.o_groups, f"a divisor of num_attention_heads={self.num_heads}")
        if self.rope.rotary_dim > self.head_dim:
            raise unsupported("partial_rotary_factor", self.rope.rotary_dim / self.head_dim,
                              "a factor giving at most head_dim rotary dims")
        compressed = self.layer_kind != "sliding"
        if compressed:
            positive_int("compress_rates", self.compress_rate)
        elif self.compress_rate:
            raise ValueError(f"CompressedAttentionConfig compress_rate={self.compress_rate} is invalid for a sliding "
                             "layer.")
        if self.layer_kind == "csa":
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                positive_int(name, getattr(self, name))
            if self.rope.rotary_dim > self.index_head_dim:
                raise unsupported("index_head_dim", self.index_head_dim,
                                  f"at least the {self.rope.rotary_dim} rotary dims (the indexer rotates its tail)")

    # -- shapes ------------------------------------------------------------------------------------------------
    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5

    @property
    def compressor_width(self) -> int:
        """Values one token's compressor row holds: its kv and its gate, each H wide (2H under CSA: the Ca and Cb
        series of overlapping windows)."""
        series = 2 if self.layer_kind == "csa" else 1
        return 2 * series * self.head_dim

    @property
    def compressor_ring(self) -> int:
        """Tokens the compressor keeps per sequence: its window (two windows under CSA, whose entry reads the
        previous window's Ca series)."""
        return (2 if self.layer_kind == "csa" else 1) * self.compress_rate

    def check_block_size(self, block_size: int) -> None:
        """An entry must never straddle two blocks: the block size is a multiple of the compress rate."""
        if self.compress_rate and block_size % self.compress_rate:
            raise ValueError(f"block_size={block_size} is invalid for DeepSeek-V4: it must be a multiple of every "
                             f"compress rate (this model's include {self.compress_rate}).")

    def kv_layer_pairs(self, num_layers: int) -> None:
        """No sliding/full pairing of tensors (gqa_config.GQAConfig.kv_layer_pairs): the window is state."""
        return None

    def fp8_row_bytes(self) -> tuple[int, ...]:
        """The fp8 rows' bytes of cache_shapes' tensors (module docstring): the entry's, then CSA's index key's."""
        rows = (fp8_row_bytes(self.head_dim, self.rope.rotary_dim, ENTRY_SCALE_GROUP),)
        return rows + ((fp8_row_bytes(self.index_head_dim, 0, INDEX_SCALE_GROUP),) if self.layer_kind == "csa" else ())

    @staticmethod
    def _fp8(cache_dtype) -> bool:
        if cache_dtype is not None and cache_dtype.itemsize == 1 and cache_dtype != torch.float8_e4m3fn:
            raise ValueError(f"kv_cache_dtype={cache_dtype} is not supported for DeepSeek-V4: its fp8 cache is "
                             "float8_e4m3fn with scales (kv_cache_dtype='fp8').")
        return cache_dtype == torch.float8_e4m3fn

    def cache_shapes(self, num_blocks: int, block_size: int, cache_dtype=None) -> tuple[tuple[int, ...], ...]:
        """The paged tensors, the null block included: () for a sliding layer; (entries_BLcH,) for HCA;
        (entries_BLcH, index_keys_BLcI) for CSA, Lc = block_size / compress_rate. With an fp8 `cache_dtype` each
        row is its fp8 bytes (fp8_row_bytes) instead of H / I values."""
        if not self.compress_rate:
            return ()
        self.check_block_size(block_size)
        per_block = block_size // self.compress_rate
        widths = (list(self.fp8_row_bytes()) if self._fp8(cache_dtype)
                  else [self.head_dim, self.index_head_dim][:2 if self.layer_kind == "csa" else 1])
        return tuple((num_blocks + 1, per_block, w) for w in widths)

    def cache_dtypes(self, cache_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        """The element types of cache_shapes' tensors: all in the cache's dtype, or uint8 rows for fp8."""
        dtype = torch.uint8 if self._fp8(cache_dtype) else cache_dtype
        return tuple(dtype for _ in self.cache_shapes(0, self.compress_rate or 1))

    def kv_values_per_token(self) -> int:
        """Paged values per token of context: an entry (and an indexer key) per compress_rate tokens, rounded up to
        a whole value (exact for every published shape: 512 / 128, (512 + 128) / 4)."""
        if not self.compress_rate:
            return 0
        return -(-(self.head_dim + (self.index_head_dim if self.layer_kind == "csa" else 0)) // self.compress_rate)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Paged bytes per token of context in a cache of `dtype` (fp8: the rows' bytes, scales and bfloat16 rope
        included, per compress_rate tokens, rounded up)."""
        if self.compress_rate and self._fp8(dtype):
            return -(-sum(self.fp8_row_bytes()) // self.compress_rate)
        return self.kv_values_per_token() * dtype.itemsize

    @property
    def window_fp8(self) -> bool:
        """Whether the window ring holds fp8 rows (an entry's bytes) rather than head_dim values."""
        return self._fp8(self.cache_dtype)

    def _slot_shapes(self) -> list[tuple[int, ...]]:
        window = self.fp8_row_bytes()[0] if self.window_fp8 else self.head_dim
        shapes = [(self.sliding_window, window)]
        if self.compress_rate:
            shapes.append((self.compressor_ring, self.compressor_width))
        if self.layer_kind == "csa":
            shapes.append((self.compressor_ring, 4 * self.index_head_dim))
        return shapes

    def state_shapes(self, num_slots: int) -> tuple[tuple[int, ...], ...]:
        """Per-sequence state pools, the null slot included (the last, as LinearAttentionConfig's): (window_PWH,)
        and, compressed, (compressor_PmC,) and under CSA (index_compressor_PmC',) (module docstring)."""
        return tuple((num_slots + 1, *s) for s in self._slot_shapes())

    def state_dtypes(self, dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        """The window in the model dtype (uint8 fp8 rows under an fp8 cache_dtype); the compressor rows at least
        float32: a gate is the projection plus a float32 position bias, softmaxed in float32 (transformers keeps it
        so; a bf16 copy would round it)."""
        rows = torch.promote_types(dtype, torch.float32)
        return (torch.uint8 if self.window_fp8 else dtype,) + tuple(rows for _ in self._slot_shapes()[1:])

    def state_bytes_per_sequence(self, dtype: torch.dtype) -> int:
        return sum(math.prod(s) * d.itemsize for s, d in zip(self._slot_shapes(), self.state_dtypes(dtype)))


def resolve_compressed_cache(attention, layer_attention: tuple, cache_dtype: torch.dtype) -> tuple:
    """(attention, layer_attention) with every compressed-attention layer's `cache_dtype` set under an fp8 KV cache
    (so its window ring is fp8 too); anything else returned as it is. ModelConfig's to call beside
    resolve_index_cache."""
    if not CompressedAttentionConfig._fp8(cache_dtype):
        return attention, layer_attention

    def one(att):
        return dataclasses.replace(att, cache_dtype=cache_dtype) if isinstance(att, CompressedAttentionConfig) else att

    return one(attention), tuple(one(a) for a in layer_attention)


def check_ring_rollback(spec, layers: tuple, arch: str) -> None:
    """Speculative decoding over compressed-attention layers (engine/config/engine_args.py asks): drafts are verified
    and each verifying sequence's window ring and compressor rings are rolled back to its accepted tokens afterwards
    (DeepSeek-V4's: engine/models/deepseek_v4/rollback.py, the ring rows the rejected drafts overwrote restored from a
    copy taken before the step). That needs each ring slot written once a step: num_speculative_tokens + 1 <= the
    smallest ring (the window, a compressor's rate, 2 x rate under CSA). `layers`: every layer's attention config,
    those of other kinds passed over (DeepSeek-V4.1's shared compressed layers rewrite every ring slot from the
    accepted tokens, engine/models/deepseek_v41/rollback.py: no bound)."""
    rings = [min(a.sliding_window, a.compressor_ring or a.sliding_window) for a in layers
             if isinstance(a, CompressedAttentionConfig)]
    if spec is None or not rings:
        return
    ring = min(rings)
    if spec.num_speculative_tokens + 1 > ring:
        raise ValueError(f"speculative_config.num_speculative_tokens={spec.num_speculative_tokens} is invalid for "
                         f"{arch}: at most {ring - 1} (a verify step's tokens must fit the smallest state ring, "
                         f"{ring} slots, so that rejected drafts can be rolled back).")


__all__ = ["ATTENTION_BOUNDS", "CompressedAttentionConfig", "ENTRY_SCALE_GROUP", "INDEX_SCALE_GROUP", "LAYER_KINDS",
           "check_ring_rollback", "fp8_row_bytes", "positive_int", "resolve_compressed_cache"]
