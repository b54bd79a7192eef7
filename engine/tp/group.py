"""A tensor-parallel group: the collectives a TP-sharded layer runs, over an explicit process group.

Legend: T tokens, R rows (logits), V vocab, Vs a rank's vocab shard, D hidden.

One `TensorParallel` per rank, passed into the model (never a global): `rank` / `size` within the group, `ranks`
the world ranks of the group (consecutive: a TP group sits inside one node), `group` the torch process group
(gloo on CPU, NCCL on GPU, as the world's; None at size 1, where every collective is the identity). Groups are
made by `make_tp_group`, which every rank of the world calls together (torch's new_group is collective).

Sums over the group: torch's all-reduce adds each element's partials in an order its algorithm sets by the tensor's
size (a ring cuts the buffer into per-rank chunks, and which chunk an element falls in decides where its sum starts),
so a token's sum would follow the batch. Batch-invariant mode (kernels/batch_invariant.py) asks for `ordered_sums`:
every rank gathers the partials and adds them in rank order, ((p0 + p1) + p2) + ..., the same bits for an element
whatever else travels with it, on every rank. The bytes moved are the all-gather's (size - 1 partials a rank, against
the ring's 2 (size - 1) / size): at TP 2 the same, beyond it more.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class TensorParallel:
    """This rank's place in its TP group and the group's collectives (identity at size 1)."""

    def __init__(self, rank: int = 0, size: int = 1, group: dist.ProcessGroup | None = None,
                 ranks: tuple[int, ...] = (0,), ordered_sums: bool = False):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"TensorParallel size={size!r} is invalid: must be a positive integer.")
        if not 0 <= rank < size:
            raise ValueError(f"TensorParallel rank={rank!r} is invalid: must be in [0, {size}).")
        if size > 1 and (group is None or len(ranks) != size):
            raise ValueError(f"TensorParallel of size {size} needs its process group and its {size} world ranks.")
        self.rank, self.size, self.group, self.ranks = rank, size, group, tuple(ranks)
        self.ordered_sums = ordered_sums  # sums in rank order (module docstring): batch-invariant mode
        # Bytes this rank sent into all-reduces / all-gathers since start (the TP benchmark reads them).
        self.all_reduce_bytes = 0
        self.all_gather_bytes = 0

    def shard(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's equal share of n (n a multiple of size)."""
        per = n // self.size
        return self.rank * per, (self.rank + 1) * per

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group, in place (a row-parallel linear's partial outputs); returns it."""
        if self.size == 1:
            return x
        self.all_reduce_bytes += x.numel() * x.element_size()
        if not self.ordered_sums:
            dist.all_reduce(x, group=self.group)
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        total = parts[0]
        for part in parts[1:]:
            total = total + part  # rank order, element by element: the same on every rank and in any batch
        return x.copy_(total)

    def all_gather_last(self, x_RVs: torch.Tensor) -> torch.Tensor:
        """[R, Vs] per rank -> [R, size * Vs], the ranks' shards side by side in rank order (the LM head's logits)."""
        if self.size == 1:
            return x_RVs
        x_RVs = x_RVs.contiguous()
        parts = [torch.empty_like(x_RVs) for _ in range(self.size)]
        self.all_gather_bytes += x_RVs.numel() * x_RVs.element_size()
        dist.all_gather(parts, x_RVs, group=self.group)
        return torch.cat(parts, dim=-1)

    def token_rows(self, num_tokens: int) -> tuple[int, int]:
        """[lo, hi) of the tokens this rank takes into the MoE layer: ceil(T / size) rows each, the last ranks
        fewer (or none). Every rank of the group computes the same split from the same T (no sync)."""
        per = -(-num_tokens // self.size)
        lo = min(num_tokens, self.rank * per)
        return lo, min(num_tokens, lo + per)

    def gather_rows(self, y_tD: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The ranks' row slices (token_rows) back into [T, D] on every rank: each pads to ceil(T / size) rows
        (all_gather moves equal sizes), the padding is dropped."""
        if self.size == 1:
            return y_tD
        per = -(-num_tokens // self.size)
        padded = y_tD.new_zeros(per, *y_tD.shape[1:])
        padded[: y_tD.shape[0]] = y_tD
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        self.all_gather_bytes += padded.numel() * padded.element_size()
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts)[:num_tokens]

    def broadcast_first(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as the group's rank 0 holds it, on every rank (the sampled tokens: one answer per group), in place."""
        if self.size > 1:
            dist.broadcast(x, src=self.ranks[0], group=self.group)
        return x

    def broadcast_first_packed(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each of `xs` (one dtype, any shapes) as the group's rank 0 holds it, by ONE broadcast of them packed
        end to end (a verify step's emitted tokens, their counts and the plain rows' tokens: one collective, not
        three). Returns new tensors, the shapes of `xs`; the identity at size 1."""
        if self.size == 1:
            return xs
        if len({x.dtype for x in xs}) > 1:
            raise ValueError(f"broadcast_first_packed packs one dtype, got {sorted(str(x.dtype) for x in xs)}.")
        flat = torch.cat([x.reshape(-1) for x in xs])
        dist.broadcast(flat, src=self.ranks[0], group=self.group)
        return tuple(part.view(x.shape) for part, x in zip(flat.split([x.numel() for x in xs]), xs))


def tp_group_ranks(world_size: int, size: int) -> list[tuple[int, ...]]:
    """The TP groups of a world: consecutive runs of `size` ranks."""
    if size < 1 or world_size % size:
        raise ValueError(f"tensor_parallel_size={size} does not divide the world of {world_size} ranks.")
    return [tuple(range(g, g + size)) for g in range(0, world_size, size)]


def make_tp_group(rank: int, world_size: int, size: int, ordered_sums: bool = False) -> TensorParallel:
    """This world rank's TP group; every rank calls it together, in the same order (new_group is collective over
    the world: each rank creates every group, keeps its own). `ordered_sums`: batch-invariant sums (module
    docstring)."""
    if size == 1:
        return TensorParallel()
    mine = None
    for ranks in tp_group_ranks(world_size, size):
        group = dist.new_group(ranks=list(ranks))
        if rank in ranks:
            mine = TensorParallel(ranks.index(rank), size, group, ranks, ordered_sums)
    return mine


__all__ = ["TensorParallel", "make_tp_group", "tp_group_ranks"]
