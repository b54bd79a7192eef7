"""Expert placement: which logical expert lives in which physical slot on which EP rank.

Legend: G logical experts, R ranks (ep_size), X most replicas of one expert,
T tokens of the sending rank, K top-k.

There are G + num_redundant physical slots. Each rank's slots are numbered
0.. in "local slot order" (the order of its stacked expert weights); global
physical slot numbers run rank-major (all of rank 0's slots, then rank 1's ...).

Primaries: G experts over R ranks as evenly as possible; when R does not divide
G the FIRST G % R ranks hold one expert more (6 experts on 4 ranks: 2, 2, 1, 1).
"contiguous": rank r holds the range [start_r, end_r); "round_robin": expert e
lives on rank e % R.

Redundant replicas (the mechanism; choosing hot experts is EPLB's job, later):
each entry of `replicas` adds one copy of that expert, appended to the
least-loaded rank (fewest slots, lowest rank on ties) among those that do not
hold it yet, so slots stay as even as the constraint allows. A rank never holds
two copies of one expert. With num_redundant > 0 and no `replicas`, each extra
slot goes to the least-loaded rank and copies the lowest-id expert that rank
lacks among those with the fewest copies: an even placeholder until EPLB
chooses hot experts.

Replica choice (`PlacementTables.route`, what dispatch asks): a logical
expert with c replicas (in rank order, as in `log2phy`) is served for token t
of rank s by replica (t + s) % c. Deterministic, so EP runs repeat exactly; it
spreads a hot expert over its replicas within a batch, and the `+ s` spreads it
across sender ranks even when every rank has a single decode token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

POLICIES = ("contiguous", "round_robin")


@dataclass(frozen=True)
class ExpertPlacement:
    """A validated map from logical experts to (rank, local slot).

    replicas: hot expert ids to copy into the redundant slots, one extra copy
    per entry (an id may repeat), or {expert id: extra copies}; normalised to a
    tuple. num_redundant: 0 means len(replicas); otherwise it must match, or,
    with no replicas, asks for that many default copies (module docstring).
    layout: an explicit placement instead (what EPLB computes, moe/eplb.py): the
    logical experts of each rank's slots, in local slot order. Every expert at
    least once, no rank empty or holding one expert twice; `replicas` then lists
    the extra copies in slot order, and policy/replicas must stay at defaults.
    """

    num_experts: int
    ep_size: int
    num_redundant: int = 0
    policy: str = "contiguous"
    replicas: Sequence[int] | Mapping[int, int] = ()
    layout: Sequence[Sequence[int]] | None = None
    _slots: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        _check_int("num_experts", self.num_experts, 1)
        _check_int("ep_size", self.ep_size, 1)
        _check_int("num_redundant", self.num_redundant, 0)
        if self.policy not in POLICIES:
            raise ValueError(f"ExpertPlacement.policy must be one of {POLICIES}, got {self.policy!r}.")
        if self.layout is not None:
            slots, replicas = self._check_layout()
        else:
            slots, replicas = self._build_slots(self._normalised_replicas())
        object.__setattr__(self, "replicas", replicas)
        object.__setattr__(self, "num_redundant", len(replicas))
        object.__setattr__(self, "_slots", slots)

    def _check_layout(self) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
        """Validate an explicit `layout`; its slots and its extra copies (each expert's 2nd, 3rd ... slot)."""
        G, R, lay = self.num_experts, self.ep_size, self.layout
        if self.policy != "contiguous" or self.replicas:
            raise ValueError("ExpertPlacement.layout is a whole placement: leave policy and replicas at their "
                             f"defaults with it, got policy={self.policy!r}, replicas={self.replicas!r}.")
        if isinstance(lay, (str, bytes)) or not isinstance(lay, Sequence) or len(lay) != R:
            raise ValueError(f"ExpertPlacement.layout must be a list of ep_size={R} lists of expert ids, got {lay!r}.")
        slots, extra, seen = [], [], set()
        for r, held in enumerate(lay):
            if isinstance(held, (str, bytes)) or not isinstance(held, Sequence) or not held:
                raise ValueError(f"ExpertPlacement.layout[{r}] must be a non-empty list of expert ids (every rank "
                                 f"holds at least one expert), got {held!r}.")
            for e in held:
                if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < G:
                    raise ValueError(f"ExpertPlacement.layout[{r}] holds {e!r}: expert ids must be integers in "
                                     f"[0, {G}).")
            if len(set(held)) != len(held):
                raise ValueError(f"ExpertPlacement.layout[{r}] holds an expert twice ({list(held)}): a rank holds "
                                 "at most one copy of each expert.")
            slots.append(tuple(int(e) for e in held))
        for s in slots:
            for e in s:
                (extra.append(e) if e in seen else seen.add(e))
        missing = sorted(set(range(G)) - seen)
        if missing:
            raise ValueError(f"ExpertPlacement.layout places no copy of experts {missing}: every expert needs one.")
        if self.num_redundant not in (0, len(extra)):
            raise ValueError(f"ExpertPlacement.num_redundant={self.num_redundant} does not match layout, which "
                             f"holds {len(extra)} extra copies.")
        return tuple(slots), tuple(extra)

    @property
    def slots_per_rank(self) -> tuple[int, ...]:
        """How many expert slots each rank holds (the length of its stacked weights)."""
        return tuple(len(s) for s in self._slots)

    def _normalised_replicas(self) -> tuple[int, ...] | None:
        """The replicas asked for, flattened to one id per extra slot; None: choose num_redundant defaults."""
        given = self.replicas
        if isinstance(given, Mapping):
            flat: list[int] = []
            for e, copies in sorted(given.items()):
                _check_int(f"replicas[{e!r}] (extra copies)", copies, 1)
                flat += [e] * copies
        elif isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
            raise ValueError(f"ExpertPlacement.replicas must be a list of expert ids or a dict "
                             f"{{expert id: extra copies}}, got {given!r}.")
        else:
            flat = list(given)
        for e in flat:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < self.num_experts:
                raise ValueError(f"ExpertPlacement.replicas holds expert id {e!r}, but ids must be integers in "
                                 f"[0, {self.num_experts}) for num_experts={self.num_experts}.")
        if not flat:
            return None if self.num_redundant else ()
        if self.num_redundant not in (0, len(flat)):
            raise ValueError(f"ExpertPlacement.num_redundant={self.num_redundant} does not match replicas, which "
                             f"add {len(flat)} slots: pass one of them, or make them agree.")
        return tuple(flat)

    def _build_slots(self, replicas: tuple[int, ...] | None) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
        G, R = self.num_experts, self.ep_size
        base, extra = divmod(G, R)
        if self.policy == "contiguous":
            slots, start = [], 0
            for r in range(R):
                n = base + (1 if r < extra else 0)  # the first G % R ranks take the extra experts
                slots.append(list(range(start, start + n)))
                start += n
        else:  # round_robin
            slots = [list(range(r, G, R)) for r in range(R)]
        copies = [1] * G
        chosen: list[int] = []
        for i in range(self.num_redundant if replicas is None else len(replicas)):
            e = self._default_replica(slots, copies) if replicas is None else replicas[i]
            free = [r for r in range(R) if e not in slots[r]]
            if not free:
                raise ValueError(f"ExpertPlacement.replicas asks for {1 + replicas.count(e)} copies of expert {e}, "
                                 f"but ep_size={R} ranks can hold at most {R} (one copy per rank).")
            slots[min(free, key=lambda r: (len(slots[r]), r))].append(e)
            copies[e] += 1
            chosen.append(e)
        empty = [r for r in range(R) if not slots[r]]
        if empty:
            raise ValueError(f"ExpertPlacement: rank {empty[0]} would hold no expert (num_experts={G} + "
                             f"num_redundant={len(chosen)} slots for ep_size={R}); every rank needs one: "
                             f"add redundant replicas or use fewer ranks.")
        return tuple(tuple(s) for s in slots), tuple(chosen)

    def _default_replica(self, slots: list[list[int]], copies: list[int]) -> int:
        """The expert the next default extra slot copies (module docstring)."""
        target = min(range(self.ep_size), key=lambda r: (len(slots[r]), r))
        lacking = [e for e in range(self.num_experts) if e not in slots[target]]
        if not lacking:
            raise ValueError(f"ExpertPlacement.num_redundant={self.num_redundant} is too many: every rank would "
                             f"hold every one of the {self.num_experts} experts.")
        return min(lacking, key=lambda e: (copies[e], e))

    # -- queries ------------------------------------------------------------------------------------
    @property
    def num_physical_experts(self) -> int:
        return self.num_experts + self.num_redundant

    @property
    def max_local_experts(self) -> int:
        return max(len(s) for s in self._slots)

    def experts_on_rank(self, rank: int) -> list[int]:
        """Logical expert ids held by `rank`, in local slot order (the order of its stacked weights)."""
        return list(self._slots[self._check_rank(rank)])

    def num_local_experts(self, rank: int) -> int:
        return len(self._slots[self._check_rank(rank)])

    def slot_offset(self, rank: int) -> int:
        """Global physical slot number of `rank`'s local slot 0."""
        return sum(len(s) for s in self._slots[: self._check_rank(rank)])

    def rank_of_slot(self, slot: int) -> int:
        """The rank holding global physical slot `slot` (rank-major numbering)."""
        _check_int("slot", slot, 0, self.num_physical_experts - 1)
        for r, s in enumerate(self._slots):
            if slot < len(s):
                return r
            slot -= len(s)
        raise AssertionError("unreachable")

    @property
    def phy2log(self) -> list[int]:
        """Logical expert of each global physical slot."""
        return [e for s in self._slots for e in s]

    @property
    def log2phy(self) -> list[list[tuple[int, int]]]:
        """For each logical expert, its replicas as (rank, local slot), in rank order."""
        out: list[list[tuple[int, int]]] = [[] for _ in range(self.num_experts)]
        for r, s in enumerate(self._slots):
            for local, e in enumerate(s):
                out[e].append((r, local))
        return out

    def expert_map(self, rank: int) -> list[int]:
        """Length-G list: the local slot of each logical expert on `rank`, -1 where `rank` does not hold it."""
        out = [-1] * self.num_experts
        for local, e in enumerate(self._slots[self._check_rank(rank)]):
            out[e] = local
        return out

    def expert_map_tensor(self, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """`expert_map(rank)` as int32 [G] (the `expert_map_G` of kernels.moe.reference_fused_moe)."""
        return torch.tensor(self.expert_map(rank), dtype=torch.int32, device=device)

    def to_tensors(self, device: torch.device | str | None = None) -> PlacementTables:
        """Device tables for dispatch: replica count [G] and (rank, local slot) of each replica [G, X], int32,
        padded with -1."""
        log2phy = self.log2phy
        X = max(len(reps) for reps in log2phy)
        ranks = [[r for r, _ in reps] + [-1] * (X - len(reps)) for reps in log2phy]
        slots = [[s for _, s in reps] + [-1] * (X - len(reps)) for reps in log2phy]
        i32 = dict(dtype=torch.int32, device=device)
        return PlacementTables(replica_count_G=torch.tensor([len(reps) for reps in log2phy], **i32),
                               replica_rank_GX=torch.tensor(ranks, **i32), replica_slot_GX=torch.tensor(slots, **i32),
                               ep_size=self.ep_size)

    def _check_rank(self, rank: int) -> int:
        _check_int("rank", rank, 0, self.ep_size - 1)
        return rank


@dataclass(frozen=True)
class PlacementTables:
    """Device tables of an expert placement: what dispatch needs to route a (token, expert) pair.

    Built by `ExpertPlacement.to_tensors`; it is the `ExpertRoute` that comm's
    dispatch asks (comm names only `ep_size` and `route`, since it must not
    import moe). All int32 on the dispatch device: replica_count_G [G] (>= 1),
    replica_rank_GX and replica_slot_GX [G, X] (the rank and local slot of each
    replica, -1 beyond the count).
    """

    replica_count_G: torch.Tensor
    replica_rank_GX: torch.Tensor
    replica_slot_GX: torch.Tensor
    ep_size: int

    @property
    def num_experts(self) -> int:
        return int(self.replica_rank_GX.shape[0])

    @property
    def max_replicas(self) -> int:
        return int(self.replica_rank_GX.shape[1])

    def padded(self, width: int) -> PlacementTables:
        """The same tables in tensors of their own, [G, width] (-1 beyond each count): every placement with at
        most `width` copies of an expert fits them, so a new one is copied in place (a captured graph keeps
        reading the same tensors)."""
        X = self.max_replicas
        if isinstance(width, bool) or not isinstance(width, int) or width < X:
            raise ValueError(f"PlacementTables.padded: width must be an integer >= max_replicas={X}, got {width!r}.")
        pad = (0, width - X)
        return PlacementTables(self.replica_count_G.clone(),
                               torch.nn.functional.pad(self.replica_rank_GX, pad, value=-1),
                               torch.nn.functional.pad(self.replica_slot_GX, pad, value=-1), self.ep_size)

    def route(self, topk_ids_TK: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`select_replicas(topk_ids_TK, self, rank)`: (dst_rank_TK int64, local_slot_TK int32)."""
        return select_replicas(topk_ids_TK, self, rank)


def select_replicas(topk_ids_TK: torch.Tensor, tables: PlacementTables, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each (token, expert) pair of sender `rank` goes: (dst_rank_TK int64, local_slot_TK int32), [T, K].

    Replica rule (module docstring): replica (t + rank) % count. No host sync.
    """
    ids_TK = topk_ids_TK.long()
    if tables.max_replicas == 1:
        return tables.replica_rank_GX[:, 0].long()[ids_TK], tables.replica_slot_GX[:, 0][ids_TK]
    tok_T = torch.arange(ids_TK.shape[0], device=ids_TK.device)
    rep_TK = (tok_T[:, None] + rank) % tables.replica_count_G.long()[ids_TK]
    return tables.replica_rank_GX.long()[ids_TK, rep_TK], tables.replica_slot_GX[ids_TK, rep_TK]


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"ExpertPlacement.{name} must be an integer {allowed}, got {value!r}.")


__all__ = ["POLICIES", "ExpertPlacement", "PlacementTables", "select_replicas"]
