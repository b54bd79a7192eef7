"""DeepSeek-V4.1's Engram conditional memory (issue 81): at the layers `engram_layer_ids` names, before the layer's
attention, each token's n-grams (the 2- .. max_ngram_size-grams ending at it) are hashed into a per-layer table; the
rows fetched give one key per hyper-connection stream and one shared value, and each stream adds the value gated by
how well it matches its key:
    gate[k] = sigmoid(signed sqrt(<x_k * w_k, key_k> * rstd(x_k) * rstd(key_k) / sqrt(D))),  x_k += gate[k] * value
(w = q_weight * k_weight; in float32, as transformers' main-branch V4.1 computes it).

The hashing (EngramLayout): token ids are first mapped onto the tokenizer's normalised vocabulary (tokens that
normalise alike share an id: `compressed_token_map`; its size must be config.json's engram_compressed_vocab_size, or
every hash would differ from the trained one); an n-gram's hash is the XOR of each of its ids times a per-layer odd
multiplier (numpy's default_rng seeded 10007 * layer), reduced modulo one prime per (n-gram size, head), the primes
drawn in order above engram_vocab_size and never reused, each head's bucket range offset within the layer's table.
Where the look-back passes the sequence's start the pad token's id stands in.

Per-sequence state: the last max_ngram_size - 1 mapped ids (as id + 1, 0 meaning none: a fresh slot), in the layer's
state pool (engine/models/shared_compressed_attention_config.py), read and written by
engine/models/ngram_embedding.causal_rows.

The table lives in host memory when it is larger than HOST_TABLE_BYTES (the published tables are ~98 GB each), rows
gathered there and copied to the device; in device memory otherwise.

Legend: T tokens, n streams, D hidden, N max_ngram_size, C hash columns ((N - 1) * heads), E head_dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ..layers import ForwardContext, param
from ..ngram_embedding import causal_rows

HOST_TABLE_BYTES = 1 << 30


def _is_prime(v: int) -> bool:
    if v < 2:
        return False
    if v % 2 == 0:
        return v == 2
    return all(v % d for d in range(3, math.isqrt(v) + 1, 2))


@dataclass(frozen=True)
class EngramLayout:
    """Every Engram layer's primes [(N - 1) x heads], bucket offsets and multipliers [N] (module docstring)."""

    layers: tuple[int, ...]
    primes: tuple[tuple[tuple[int, ...], ...], ...]
    multipliers: tuple[tuple[int, ...], ...]
    max_ngram: int
    heads: int
    head_dim: int
    pad_id: int

    @classmethod
    def from_config(cls, hf: dict, vocab: int) -> "EngramLayout":
        layers = tuple(hf["engram_layer_ids"])
        N, heads, start = int(hf["engram_max_ngram_size"]), int(hf["engram_n_heads"]), int(hf["engram_vocab_size"])
        taken: set[int] = set()
        primes = []
        for _ in layers:
            per_layer = []
            for _ in range(N - 1):
                row, v = [], start - 1
                for _ in range(heads):
                    v += 1
                    while not _is_prime(v) or v in taken:
                        v += 1
                    taken.add(v)
                    row.append(v)
                per_layer.append(tuple(row))
            primes.append(tuple(per_layer))
        bound = max(1, (np.iinfo(np.int64).max // vocab) // 2)
        mults = tuple(tuple(int(x) * 2 + 1 for x in np.random.default_rng(10007 * layer).integers(
            low=0, high=bound, size=(N,), dtype=np.int64)) for layer in layers)
        return cls(layers, tuple(primes), mults, N, heads, int(hf["engram_head_dim"]), int(hf["engram_pad_id"]))

    def columns(self) -> int:
        return (self.max_ngram - 1) * self.heads

    def offsets(self, j: int) -> list[int]:
        flat = [p for per in self.primes[j] for p in per]
        return [sum(flat[:c]) for c in range(len(flat))]


def compressed_token_map(tokenizer_file: Path) -> tuple[list[int], int]:
    """(each token id's normalised id, how many there are): a token decoded alone, NFKC / NFD, accents stripped,
    lowercased, whitespace runs one space, stripped unless it is exactly one space; a token that decodes to a broken
    UTF-8 sequence keyed by its raw form; ids given in order of first appearance."""
    from tokenizers import Regex, Tokenizer, normalizers

    tok = Tokenizer.from_file(str(tokenizer_file))
    keep_space = "\ue000"  # a private-use character holds a lone space through Strip()
    norm = normalizers.Sequence([normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(),
                                 normalizers.Lowercase(), normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
                                 normalizers.Replace(Regex(r"^ $"), keep_space), normalizers.Strip(),
                                 normalizers.Replace(keep_space, " ")])
    ids: dict[str, int] = {}
    out = []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        text = tok.decode([i], skip_special_tokens=False)
        key = tok.id_to_token(i) if "\ufffd" in text else (norm.normalize_str(text) or text)
        out.append(ids.setdefault(key, len(ids)))
    return out, len(ids)


class EngramHash(nn.Module):
    """The model's hashing constants (one per model, shared by its Engram layers): the token map [V] and each
    layer's multipliers, primes and offsets."""

    def __init__(self, layout: EngramLayout, token_map: list[int], device=None):
        super().__init__()
        self.layout = layout
        long = dict(dtype=torch.long, device=device)
        self.register_buffer("token_map_V", torch.tensor(token_map, **long), persistent=False)
        self.register_buffer("mult_LN", torch.tensor(layout.multipliers, **long), persistent=False)
        self.register_buffer("primes_LMH", torch.tensor(layout.primes, **long), persistent=False)
        self.register_buffer("offsets_LC", torch.tensor([layout.offsets(j) for j in range(len(layout.layers))],
                                                        **long), persistent=False)

    def rows(self, j: int, ids_T: torch.Tensor, pool_PK: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Engram layer j's table rows of each token [T, C], its look-back read from (and written to) `pool_PK`."""
        lay = self.layout
        mapped_T = self.token_map_V[ids_T.long()]
        earlier_TK = causal_rows((mapped_T + 1)[:, None], pool_PK.unsqueeze(-1), ctx, [])[..., 0]  # 0: none
        pad = self.token_map_V[lay.pad_id]
        tokens, blocked = [mapped_T], torch.zeros_like(mapped_T, dtype=torch.bool)
        for s in range(1, lay.max_ngram):
            prev = earlier_TK[:, -s]
            blocked = blocked | (prev == 0)
            tokens.append(torch.where(blocked, pad, prev - 1))
        products_TN = torch.stack(tokens, dim=1) * self.mult_LN[j]  # int64, wrapping
        rolling, cols = products_TN[:, 0], []
        for n in range(1, lay.max_ngram):
            rolling = torch.bitwise_xor(rolling, products_TN[:, n])
            cols.append(rolling[:, None] % self.primes_LMH[j, n - 1][None, :])
        return torch.cat(cols, dim=1) + self.offsets_LC[j][None, :]


class Engram(nn.Module):
    """One layer's table and projections (module docstring). `j`: its index among the Engram layers."""

    def __init__(self, j: int, rows: int, hashing: EngramHash, hidden: int, streams: int, eps: float, dtype,
                 device=None):
        super().__init__()
        lay = hashing.layout
        self.j, self.hashing, self.D, self.n, self.eps = j, hashing, hidden, streams, eps
        big = rows * lay.head_dim * torch.tensor([], dtype=dtype).element_size() > HOST_TABLE_BYTES
        self.table_VE = nn.Parameter(torch.zeros(rows, lay.head_dim, dtype=dtype,
                                                 device=torch.device("cpu") if big else device), requires_grad=False)
        self.wkv = param(hidden * (streams + 1), lay.columns() * lay.head_dim, dtype=dtype, device=device)
        self.q_weight = param(streams, hidden, dtype=dtype, device=device)
        self.k_weight = param(streams, hidden, dtype=dtype, device=device)

    def forward(self, x_TnD: torch.Tensor, ids_T: torch.Tensor, pool_PK: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        rows_TC = self.hashing.rows(self.j, ids_T, pool_PK, ctx)
        emb = self.table_VE.index_select(0, rows_TC.reshape(-1).to(self.table_VE.device)).to(x_TnD.device)
        kv = F.linear(emb.view(rows_TC.shape[0], -1).to(self.wkv.dtype), self.wkv)
        key, value = kv.split([self.n * self.D, self.D], dim=-1)
        key = key.float().unflatten(-1, (self.n, self.D))
        h = x_TnD.float()
        w = self.q_weight.float() * self.k_weight.float()
        rstd = torch.rsqrt(h.square().mean(-1) + self.eps) * torch.rsqrt(key.square().mean(-1) + self.eps)
        dot = (h * w * key).sum(-1) * rstd * self.D**-0.5
        gate = torch.sigmoid(torch.copysign(dot.abs().clamp_min(1e-6).sqrt(), dot))
        return (h + gate.unsqueeze(-1) * value.float().unsqueeze(-2)).to(x_TnD.dtype)

    def weight_plan(self, p: str) -> WeightPlan:
        """`p` = "model.layers.{i}.engram."; the float table's per-row scales (`embed.scale`) are not read."""
        return {p + "embed.weight": PlanEntry(self.table_VE, ()), p + "wkv.weight": PlanEntry(self.wkv, ()),
                p + "q_weight": PlanEntry(self.q_weight, ()), p + "k_weight": PlanEntry(self.k_weight, ())}


__all__ = ["Engram", "EngramHash", "EngramLayout", "HOST_TABLE_BYTES", "compressed_token_map"]
