"""DeepSeek-V4.1's Engram conditional memory (issue 81): at the layers `engram_layer_ids` names, before the layer's
attention, each token's n-grams (the 2- .. max_ngram_size-grams ending at it) are hashed into a per-layer table; the
rows fetched give one key per hyper-connection stream and one shared value, and each stream adds the value gated by
how well it matches its key:
    gate[k] = sigmoid(signed sqrt(<x_k * w_k, key_k> * rstd(x_k) * rstd(key_k) / sqrt(D))),  x_k += gate[k] * value
(w = q_weight * k_weight; in float32, as transformers' main-branch V4.1 computes it).

The hashing (reader.py's EngramLayout): token ids are first mapped onto the tokenizer's normalised vocabulary (tokens that
normalise alike share an id: `compressed_token_map`; its size must be config.json's engram_compressed_vocab_size, or
every hash would differ from the trained one); an n-gram's hash is the XOR of each of its ids times a per-layer odd
multiplier (numpy's default_rng seeded 10007 * layer), reduced modulo one prime per (n-gram size, head), the primes
drawn in order above engram_vocab_size and never reused, each head's bucket range offset within the layer's table.
Where the look-back passes the sequence's start the pad token's id stands in.

Per-sequence state: the last max_ngram_size - 1 mapped ids (as id + 1, 0 meaning none: a fresh slot), in the layer's
state pool (engine/models/shared_compressed_attention_config.py), read and written by
engine/models/ngram_embedding.causal_rows; after a verify step, `replay_rows` writes the accepted tokens' ids (the
Engram is its own StateHook, blocks.LaggedHyperLayer.state_hook).

The table lives in host memory when it is larger than HOST_TABLE_BYTES (the published tables are ~98 GB each), rows
gathered there and copied to the device; in device memory otherwise.

Legend: T tokens, n streams, D hidden, N max_ngram_size, C hash columns ((N - 1) * heads), E head_dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ..layers import ForwardContext, param
from ..ngram_embedding import causal_rows, replay_rows
from .reader import EngramLayout

HOST_TABLE_BYTES = 1 << 30


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

    def rows(self, j: int, ids_T: torch.Tensor, pool_PK: torch.Tensor, ctx: ForwardContext,
             pending: list) -> torch.Tensor:
        """Engram layer j's table rows of each token [T, C], its look-back read from (and written to) `pool_PK`; a
        verify step's verifying sequences leave it as it is and append to `pending` what their replay needs."""
        lay = self.layout
        mapped_T = self.token_map_V[ids_T.long()]
        earlier_TK = causal_rows((mapped_T + 1)[:, None], pool_PK.unsqueeze(-1), ctx, pending)[..., 0]  # 0: none
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
        self.pending: list = []  # a verify step's look-backs to replay after sampling (ngram_embedding.causal_rows)

    def before(self, ctx: ForwardContext, positions_T: torch.Tensor) -> None:
        """A step's start (blocks/attention.StateHook): nothing to copy, the verifying look-backs are left as
        they are; what an earlier verify step left unreplayed (it never sampled) is dropped."""
        self.pending.clear()

    def replay(self, num_accepted_S: torch.Tensor) -> None:
        """After a verify step's sampling: each verifying sequence's look-back takes its accepted tokens only."""
        replay_rows(self.pending, num_accepted_S)

    def forward(self, x_TnD: torch.Tensor, ids_T: torch.Tensor, pool_PK: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        rows_TC = self.hashing.rows(self.j, ids_T, pool_PK, ctx, self.pending)
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


__all__ = ["Engram", "EngramHash", "HOST_TABLE_BYTES"]
