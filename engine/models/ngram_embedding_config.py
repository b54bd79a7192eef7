"""Hashed n-gram embedding tables as config: a reusable block kind (engine/models/ngram_embedding.py) that looks each
token's preceding n-grams up in large hashed tables (Qwen3.8-Flash-Next's Per-Layer Embedding, "PLE"; the table shape
DeepSeek-V4.1's Engram uses). Pure data: no model code, no torch.

What it computes per token t (transformers' Qwen4ExpTextNGramEmbedding is the definition): the token history
h_0 = id[t], h_s = id[t - s] for s < ngram_size, where a position before the sequence, or one at or after the last
end-of-sequence token before t, reads `eos_token_id` (documents restart the n-grams). For each order
n in [2, ngram_size] and each of `heads_per_ngram` heads:
    mixed_n = (h_0 * m_0) xor (h_1 * m_1) xor ... xor (h_{n-1} * m_{n-1})        (int64, wrapping)
    row = mixed_n mod vocab[head] + offset[head]
with the table's multipliers m (splitmix64 of `seed` and the table's index) and a distinct prime `vocab[head]` per
head (the primes after `vocab_base`, numbered across every table of the model). The looked-up rows
(embed_dim / heads wide each) are concatenated: [T, embed_dim].

Per sequence the block keeps the last ngram_size - 1 token ids as state (a fixed-size state like linear attention's:
engine/state/cache.py holds it, prefix caching checkpoints it).

`placement`: where the table lives. "device" (the default) beside the other weights; "host": in host memory, the
lookups gathered there and the rows copied to the device (the published tables are ~45 B parameters, far more than a
device holds; the seam is here, the host path is plain torch for now).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config.refusals import unsupported

NGRAM_PLACEMENTS = ("device", "host")
# The most each may be (engine/models/gated_deltanet_config.py's LINEAR_BOUNDS say why): published values times a margin.
NGRAM_BOUNDS = {
    "ngram_size": 16,  # published 3
    "heads_per_ngram": 1 << 8,  # published 8
    "ple_embed_dim": 1 << 16,  # published hidden_size
    "ngram_vocab_size_base": 1 << 31,  # published 20,000,000 (rows per head)
    "make_ngram_vocab_size_divisible_by": 1 << 20,
}

_MASK64 = (1 << 64) - 1
_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
_SPLITMIX_M1 = 0xBF58476D1CE4E5B9
_SPLITMIX_M2 = 0x94D049BB133111EB
_PRIME_1 = 10007


def _splitmix64(value: int) -> int:
    value = (value + _SPLITMIX_GAMMA) & _MASK64
    value = ((value ^ (value >> 30)) * _SPLITMIX_M1) & _MASK64
    value = ((value ^ (value >> 27)) * _SPLITMIX_M2) & _MASK64
    return (value ^ (value >> 31)) & _MASK64


def _is_prime(value: int) -> bool:
    if value < 2:
        return False
    if value % 2 == 0:
        return value == 2
    return all(value % d for d in range(3, math.isqrt(value) + 1, 2))


def _bounded(name: str, v) -> None:
    most = NGRAM_BOUNDS[name]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most:
        raise unsupported(name, v, f"an integer in [1, {most}]")


@dataclass(frozen=True)
class NGramEmbeddingConfig:
    """One hashed n-gram table (module docstring). `table_index`: the table's number among the model's tables
    (its primes follow the previous tables' and its multipliers are seeded by it)."""

    vocab_size: int  # the token vocabulary (the multipliers keep id * m below 2^63)
    ngram_size: int
    heads_per_ngram: int
    embed_dim: int
    vocab_base: int  # ngram_vocab_size_base
    divisible_by: int  # make_ngram_vocab_size_divisible_by: the table's rows padded to a multiple
    seed: int
    eos_token_id: int
    table_index: int
    placement: str = "device"
    # The heads' prime vocabularies, computed once in __post_init__ (not config: derived).
    head_vocab_sizes: tuple[int, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        _bounded("ngram_size", self.ngram_size)
        if self.ngram_size < 2:
            raise unsupported("ngram_size", self.ngram_size, "an integer >= 2 (bigrams and up)")
        _bounded("heads_per_ngram", self.heads_per_ngram)
        _bounded("ple_embed_dim", self.embed_dim)
        _bounded("ngram_vocab_size_base", self.vocab_base)
        _bounded("make_ngram_vocab_size_divisible_by", self.divisible_by)
        if self.embed_dim % self.num_heads:
            raise unsupported("ple_embed_dim", self.embed_dim, f"a multiple of the n-gram heads, (ngram_size - 1) * "
                                                               f"heads_per_ngram = {self.num_heads}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise unsupported("seed", self.seed, "an integer >= 0")
        if isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int) or \
                not 0 <= self.eos_token_id < self.vocab_size:
            raise unsupported("eos_token_id", self.eos_token_id, f"a token id in [0, {self.vocab_size}) (the n-grams "
                                                                 "restart after it)")
        if self.placement not in NGRAM_PLACEMENTS:
            raise ValueError(f"NGramEmbeddingConfig placement={self.placement!r} is invalid: allowed: "
                             f"{', '.join(NGRAM_PLACEMENTS)}.")
        if not self.head_vocab_sizes:
            object.__setattr__(self, "head_vocab_sizes", self._primes())

    @property
    def num_heads(self) -> int:
        return (self.ngram_size - 1) * self.heads_per_ngram

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def context_len(self) -> int:
        """The token ids a sequence carries from step to step: the last ngram_size - 1."""
        return self.ngram_size - 1

    def _primes(self) -> tuple[int, ...]:
        """The heads' vocabularies: prime number k + 1 after vocab_base - 1 for global head k (transformers'
        _find_nth_prime_after, walked once for every table up to this one)."""
        first = self.table_index * self.num_heads
        sizes, prime = [], self.vocab_base - 1
        for k in range(first + self.num_heads):
            prime += 1
            while not _is_prime(prime):
                prime += 1
            if k >= first:
                sizes.append(prime)
        return tuple(sizes)

    @property
    def head_offsets(self) -> tuple[int, ...]:
        return tuple(sum(self.head_vocab_sizes[:h]) for h in range(self.num_heads))

    @property
    def rows(self) -> int:
        """The table's rows: every head's vocabulary, padded to a multiple of divisible_by."""
        return -(-sum(self.head_vocab_sizes) // self.divisible_by) * self.divisible_by

    def multipliers(self) -> tuple[int, ...]:
        """m_0 .. m_{ngram_size - 1}: odd, below (2^63 - 1) // vocab_size (transformers' _build_layer_multipliers)."""
        half_bound = max(1, ((1 << 63) - 1) // max(self.vocab_size, 1) // 2)
        base_seed = self.seed + _PRIME_1 * self.table_index
        return tuple(2 * (_splitmix64((base_seed + _SPLITMIX_GAMMA * (i + 1)) & _MASK64) % half_bound) + 1
                     for i in range(self.ngram_size))

    def table_bytes(self, itemsize: int) -> int:
        return self.rows * self.head_dim * itemsize


__all__ = ["NGRAM_BOUNDS", "NGRAM_PLACEMENTS", "NGramEmbeddingConfig"]
