"""Which KV heads a rank's cache holds under tensor parallelism, and how a decode rank takes exactly its heads from
the prefill rank(s) that hold them (docs/disaggregation.md, "Tensor parallelism on either side").

Legend: K the model's kv heads, P the prefill engine's TP size, D the decode engine's, p / d a rank's place in its
TP group, H a cache's kv heads (per rank), N blocks, B block size, X bytes of a row.

A TP rank's cache holds its heads only (engine/tp/attention.py): GQA's kv heads split D ways, or (K < D)
the one its query heads read, replicated; MLA's latent (and DSA's indexer keys) whole on every rank. So a prompt's
KV is P shards on the prefill side and must become D shards on the decode side, as vLLM's NixlConnector maps each
decode rank's heads onto the prefill ranks that hold them. Here:
- **The save**: every prefill rank that is the first of its group to hold its heads saves them, under the one
  capability of the request (`save_token`: the scheduler's 22 characters plus `-tp<P>` when P > 1, so the decode
  side knows the prefill group's size; the request's output names the group's first port and `remote_ranks=P`).
  A rank whose heads an earlier rank also holds (K < P), and every rank but the first for a whole latent, saves
  nothing: MLA's latent is saved and read once, not P times.
- **The fetch**: a decode rank asks each prefill rank that holds some of its heads (`plan_fetches`) for exactly
  those heads: the request's key is the capability followed by a `ShardAsk` (`.start.count.K.d.D`), so every
  transport carries it unchanged (tcp, shm, collective, NIXL's copy path); its layout is its own with the head
  dim set to the heads asked (`with_heads`). The prefill rank checks the ask against what it holds, cuts those
  heads out of its saved rows (`slice_heads`, one copy of the asked bytes) and claims the entry once per decode
  rank: it is dropped when every decode rank whose heads it holds has taken them (`needed_ranks`). The decode
  rank writes the rows at its heads' offset in its blocks (`PagedKVBlocks.write_group`'s `heads`).
- A whole latent is asked of the group's first prefill rank by every decode rank, whole.
- A hybrid model's per-sequence states (linear attention: conv and recurrent states of the rank's own heads) are
  not cut: they move rank to rank between engines of one TP size only (P = D; `plan_fetches`' `states`), decode
  rank d taking prefill rank d's whole save, which only it may claim (`SavedKVStore.reader`). Another TP size is
  refused naming why (a conv state's channels interleave its heads' q, k and v sections).
No gather across prefill ranks and no full-head copy: each byte crosses the wire once per decode rank that holds
its head (K < D replicates a head on D / K decode ranks, each fetching it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..contract.kv_blocks import FULL, SLIDING, SavedKV
from ..tp.attention import kv_head_start

CAPABILITY_CHARS = 22  # engine/kv_transfer/auth.py's new_capability: 16 random bytes, URL-safe
_TP_SUFFIX = re.compile(r"-tp([1-9][0-9]{0,3})\Z")
_ASK = re.compile(r"\.([0-9]{1,4})\.([0-9]{1,4})\.([0-9]{1,4})\.([0-9]{1,4})\.([1-9][0-9]{0,3})\Z")


@dataclass(frozen=True)
class Heads:
    """Global kv heads [start, start + count) of `total`."""

    start: int
    count: int
    total: int

    def overlap(self, other: "Heads") -> "Heads | None":
        lo, hi = max(self.start, other.start), min(self.start + self.count, other.start + other.count)
        return Heads(lo, hi - lo, self.total) if hi > lo else None


def rank_heads(tp_rank: int, tp_size: int, num_kv_heads: int) -> Heads:
    """The kv heads TP rank `tp_rank` of `tp_size` holds (engine/tp/attention.py's split)."""
    return Heads(kv_head_start(tp_rank, tp_size, num_kv_heads), max(1, num_kv_heads // tp_size), num_kv_heads)


def first_holder(tp_rank: int, tp_size: int, num_kv_heads: int) -> bool:
    """Whether no earlier rank of the group holds this rank's heads (K < tp replicates each head); a whole latent
    (`num_kv_heads` 0) is held first by rank 0 only."""
    if num_kv_heads == 0:
        return tp_rank == 0
    return tp_rank == 0 or kv_head_start(tp_rank - 1, tp_size, num_kv_heads) != kv_head_start(tp_rank, tp_size,
                                                                                                num_kv_heads)


@dataclass(frozen=True)
class KVShardSpec:
    """An engine's TP layout as its KV connector needs it: `tp_size` ranks per group, `num_kv_heads` the model's kv
    heads (0: MLA / DSA, the latent whole on every rank), `join_id` naming the group's report channel
    (engine/kv_transfer/tp_join.py; fresh per engine)."""

    tp_size: int
    num_kv_heads: int
    join_id: str
    states: bool = False  # per-sequence state groups (a hybrid model's linear attention): see `saves`

    def __post_init__(self) -> None:
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"KVShardSpec.tp_size={self.tp_size!r} is invalid: must be an integer >= 1.")
        if not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 0:
            raise ValueError(f"KVShardSpec.num_kv_heads={self.num_kv_heads!r} is invalid: must be an integer >= 0 "
                             "(0: a latent whole on every rank).")

    def heads(self, tp_rank: int) -> Heads | None:
        """The heads rank `tp_rank` holds; None for a whole latent."""
        return None if self.num_kv_heads == 0 else rank_heads(tp_rank, self.tp_size, self.num_kv_heads)

    def saves(self, tp_rank: int) -> bool:
        """Whether this rank saves: the first holder of its heads, or every rank when there are state groups (a
        rank's linear-attention state is its own heads', never replicated)."""
        return self.states or first_holder(tp_rank, self.tp_size, self.num_kv_heads)


def split_groups(layout: tuple) -> list[bool]:
    """Per group of a `PagedKVBlocks.layout`, whether its rows are per kv head: a paged (full / sliding) group whose
    tensors' rows are [B, H, X] (GQA's k and v); MLA's latent and DSA's keys are [B, X], a state group is neither."""
    return [kind in (FULL, SLIDING) and all(len(shape) == 3 for _, shape in tensors) for kind, tensors in layout]


def layout_heads(layout: tuple) -> int | None:
    """The kv heads a cache of `layout` holds (its head-split groups' H, one value), or None: no head-split group
    (a whole latent). ValueError when groups disagree (a model of mixed KV kinds has no head shard here)."""
    hs = {shape[1] for split, (_, tensors) in zip(split_groups(layout), layout) if split for _, shape in tensors}
    if len(hs) > 1:
        raise ValueError(f"the cache's groups hold {sorted(hs)} kv heads: one head shard per rank is needed")
    return hs.pop() if hs else None


def local_heads(spec: KVShardSpec | None, tp_rank: int, layout: tuple) -> Heads | None:
    """This rank's heads: the spec's under TP; without one (one rank per group) every head its cache holds."""
    if spec is not None and spec.tp_size > 1:
        return spec.heads(tp_rank)
    h = layout_heads(layout)
    return None if h is None else Heads(0, h, h)


def with_heads(layout: tuple, count: int) -> tuple:
    """`layout` with every head-split group's H set to `count` (the rows a shard ask carries)."""
    return tuple((kind, tuple((dt, (shape[0], count) + tuple(shape[2:])) for dt, shape in tensors)) if split
                 else (kind, tensors) for split, (kind, tensors) in zip(split_groups(layout), layout))


def slice_heads(saved: SavedKV, offset: int, count: int) -> SavedKV:
    """Heads [offset, offset + count) of `saved`'s per-head rows (uint8 [N, B, H, X]), copied contiguous; the other
    groups as they are."""
    splits = split_groups(saved.layout)
    groups = [(idx, tuple(r[:, :, offset:offset + count].contiguous() for r in rows) if split else rows)
              for split, (idx, rows) in zip(splits, saved.groups)]
    return SavedKV(saved.num_tokens, saved.token_ids, with_heads(saved.layout, count), groups)


# ---------------------------------------------------------------- the capability and the ask on the wire
def save_token(capability: str, tp_size: int) -> str:
    """The token a save is stored under and its request's output names: the capability, and `-tp<P>` when the
    prefill group has P > 1 ranks (a kv token's alphabet; engine/contract/kv_transfer_params.is_kv_token)."""
    return capability if tp_size == 1 else f"{capability}-tp{tp_size}"


def token_tp_size(token: str) -> int:
    """The prefill group's TP size a token names (`save_token`); 1 for a plain capability."""
    m = _TP_SUFFIX.match(token, CAPABILITY_CHARS) if len(token) > CAPABILITY_CHARS else None
    return int(m.group(1)) if m else 1


@dataclass(frozen=True)
class ShardAsk:
    """What one decode rank asks of one prefill rank: `heads` (None: a whole latent) for decode rank `rank` of
    `ranks`."""

    heads: Heads | None
    rank: int
    ranks: int

    def key(self, token: str) -> str:
        h = self.heads or Heads(0, 0, 0)
        return f"{token}.{h.start}.{h.count}.{h.total}.{self.rank}.{self.ranks}"


def parse_key(key: str) -> tuple[str, ShardAsk | None]:
    """(the token, the ask) of a request's key; (key, None) for a plain key (no TP on either side)."""
    m = _ASK.search(key)
    if m is None:
        return key, None
    start, count, total, rank, ranks = (int(x) for x in m.groups())
    if rank >= ranks or (total == 0) != (count == 0) or start + count > total:
        raise ValueError("a KV shard ask that is not one (heads past the total, or a rank past the ranks)")
    return key[:m.start()], ShardAsk(Heads(start, count, total) if total else None, rank, ranks)


def needed_ranks(held: Heads | None, ask: ShardAsk) -> frozenset[int]:
    """The decode ranks (of `ask.ranks`) that take something from a prefill rank holding `held`: its entry is
    dropped once each has claimed it."""
    if held is None or ask.heads is None:
        return frozenset(range(ask.ranks))
    return frozenset(d for d in range(ask.ranks)
                     if rank_heads(d, ask.ranks, held.total).overlap(held) is not None)


def plan_fetches(mine: Heads | None, tp_rank: int, tp_size: int, prefill_tp: int,
                 states: bool = False) -> list[tuple[int, ShardAsk]]:
    """(prefill rank of the group, ask) for each fetch decode rank `tp_rank` of `tp_size` makes to hold `mine`:
    a whole latent from rank 0; heads from the first prefill rank holding each part of them; with state groups
    (`states`) everything from the prefill rank of its own place (ValueError for another TP size)."""
    if states:
        if prefill_tp != tp_size:
            raise ValueError(f"per-sequence states (linear attention's, DeepSeek-V4's windows) move only between "
                             f"engines of one TP size, rank to rank: this decode engine runs tensor_parallel_size="
                             f"{tp_size}, the prefill engine {prefill_tp} (linear attention's conv channels interleave "
                             "its heads' q, k and v: not cut)")
        return [(tp_rank, ShardAsk(mine, tp_rank, tp_size))]
    if mine is None:
        return [(0, ShardAsk(None, tp_rank, tp_size))]
    out = []
    for p in range(prefill_tp):
        part = rank_heads(p, prefill_tp, mine.total).overlap(mine) if first_holder(p, prefill_tp, mine.total) else None
        if part is not None:
            out.append((p, ShardAsk(part, tp_rank, tp_size)))
    return out


def check_ask(held: Heads | None, ask: ShardAsk, reader: tuple[int, int] | None = None) -> str | None:
    """Why this prefill rank cannot answer `ask` (None: it can): another KV kind, heads it does not hold, or (a save
    with states, `reader` = (its rank, its TP size)) a decode rank of another place."""
    if reader is not None and (ask.rank, ask.ranks) != reader:
        return (f"this prefill rank's save holds linear-attention states of TP rank {reader[0]} of {reader[1]}: "
                f"decode rank {ask.rank} of {ask.ranks} cannot take them")
    if (held is None) != (ask.heads is None):
        return "the shard ask and this prefill rank's cache are of another KV kind (per-head vs a whole latent)"
    if held is not None and (held.total != ask.heads.total or ask.heads.overlap(held) != ask.heads):
        return (f"this prefill rank holds kv heads {held.start}-{held.start + held.count - 1} of {held.total}, "
                f"not {ask.heads.start}-{ask.heads.start + ask.heads.count - 1} of {ask.heads.total}")
    return None


__all__ = ["CAPABILITY_CHARS", "Heads", "KVShardSpec", "ShardAsk", "check_ask", "first_holder", "layout_heads",
           "local_heads", "needed_ranks", "parse_key", "plan_fetches", "rank_heads", "save_token", "slice_heads",
           "split_groups", "token_tp_size", "with_heads"]
