"""A rank's adapters: an LRU of adapters read into host memory, and `max_loras` device slots holding each target's
A / B stacked by slot (a linear's A_[slot] [R, K], B_[slot] [N, R]; an expert tensor's per expert, row slot E + e),
zero-padded to R = max_lora_rank, with a scale per slot and target; each step's per-token slot index (-1: the row's
request has no adapter).

Legend: L slots, R max_lora_rank, K in features, N out features, E experts, D hidden, I expert intermediate, T tokens.

Slots are given out by the runner as requests arrive: an adapter already in a slot keeps it, else it takes a free
slot or the least recently used one no request in the batch holds. The scheduler never runs more adapters at once
than slots (scheduler/scheduler.py), so one is always there. A slot's weights are written as a device op, in stream
order with the steps (`take_loads`): a step still in flight reads the adapter it was launched with.
"""
from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..config.lora import LoRAConfig
from ..contract.host_copy import to_device
from ..contract.lora import LoRARequest
from .adapter import Adapter, ModelTargets, read_adapter
from .experts import ExpertsLoRA
from .loader import SHARED, shared_key
from .layer import LinearLoRA, LoRAPiece, LoRAStep


@dataclass(frozen=True)
class LoRATarget:
    """One linear LoRA may target, as the model holds it: the Linear (its `lora` hook is set here), the rows of
    its output this module is (a piece of a stacked projection: q of qkv_proj), its width N and in features K (a TP
    shard's), the checkpoint rows those hold (a TP column shard's slice, MLA's rope de-interleave order: B's rows
    are read there) and the checkpoint columns its input is (a TP row-parallel shard's: A's columns); None: all,
    as stored."""

    linear: Any
    rows: slice
    n: int
    k: int
    row_sel: Any = None
    col_sel: Any = None


@dataclass(frozen=True)
class ExpertTarget:
    """One MoE layer's float experts as this rank holds them (its `lora_experts` hook is set here): E local experts,
    hidden D, intermediate I (a TP shard's). `experts`: the logical expert of each local slot under EP (redundant
    copies included; None: all, in order); `shard`: (i0, I whole) where TP splits every expert's intermediate
    channels, this rank's [i0, i0 + I) (gate_up's B rows of gate and of up, down's A columns; None: whole)."""

    layer: Any
    e: int
    d: int
    i: int
    experts: tuple[int, ...] | None = None
    shard: tuple[int, int] | None = None


class HostAdapters:
    """Adapters read into host memory, least recently used evicted past `capacity` (max_cpu_loras). `prefetch` reads
    adapters on a worker thread ahead of their first request (the driver's word: SchedulerOutput.lora_prefetch), so
    that `get`, on the step loop, finds them read (or waits only for the rest of a read in flight)."""

    def __init__(self, capacity: int, read: Callable[[LoRARequest], Adapter]):
        self.capacity, self.read = capacity, read
        self.by_id: OrderedDict[int, Adapter] = OrderedDict()
        self._reading: dict[int, Future] = {}  # prefetches in flight or done, not yet taken by `get`
        self._pool: ThreadPoolExecutor | None = None

    def prefetch(self, reqs) -> None:
        for req in reqs:
            if req.lora_int_id in self.by_id or req.lora_int_id in self._reading:
                continue
            if self._pool is None:  # made on first use: one thread per rank that reads ahead
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moelink-lora-prefetch")
            self._reading[req.lora_int_id] = self._pool.submit(self.read, req)
        while len(self._reading) > self.capacity:  # read ahead for requests that never came here (aborted): dropped
            self._reading.pop(next(iter(self._reading)))

    def get(self, req: LoRARequest) -> Adapter:
        a = self.by_id.get(req.lora_int_id)
        if a is None:
            pending = self._reading.pop(req.lora_int_id, None)
            a = self.by_id[req.lora_int_id] = pending.result() if pending is not None else self.read(req)
            while len(self.by_id) > self.capacity:
                self.by_id.popitem(last=False)
        self.by_id.move_to_end(req.lora_int_id)
        return a


@dataclass
class _Slot:
    lora_int_id: int = 0  # 0: empty
    last_used: int = 0


@dataclass
class LoRASlots:
    """The device slots of one rank and the hooks on its targets (linears by module name, experts by the MoE
    layer's "model.layers.{i}.mlp.experts")."""

    limits: LoRAConfig
    targets: dict[str, LoRATarget]
    experts: dict[str, ExpertTarget]
    kernels: Any
    dtype: torch.dtype
    device: torch.device
    checkpoint: ModelTargets  # the checkpoint's targets, whole (model_targets): what adapters are checked against
    model_dir: str = ""  # the checkpoint's directory: the key of the adapters the driver read (loader.py SHARED)
    step: LoRAStep = field(init=False)
    host: HostAdapters = field(init=False)

    def __post_init__(self) -> None:
        L, R = self.limits.num_slots, self.limits.max_lora_rank
        self.step = LoRAStep()
        self.pieces: dict[str, LoRAPiece] = {}
        self.rows_per_slot: dict[str, int] = {}  # E for an expert tensor's stacks, 1 for a linear's
        for name, t in self.targets.items():
            piece = self._piece(t.rows, L, R, t.k, t.n)
            if t.linear.lora is None:
                t.linear.lora = LinearLoRA(self.step, self.kernels)
            t.linear.lora.pieces.append(piece)
            self.pieces[name], self.rows_per_slot[name] = piece, 1
        self.expert_of: dict[str, ExpertTarget] = {}  # an expert piece's layer (its local experts, its shard)
        for name, x in self.experts.items():
            gate_up, down = self._piece(None, L * x.e, R, x.d, 2 * x.i), self._piece(None, L * x.e, R, x.i, x.d)
            x.layer.lora_experts = ExpertsLoRA(self.step, self.kernels, x.e, gate_up, down)
            for param, piece in (("gate_up_proj", gate_up), ("down_proj", down)):
                self.pieces[f"{name}.{param}"], self.rows_per_slot[f"{name}.{param}"] = piece, x.e
                self.expert_of[f"{name}.{param}"] = x
        self.host = HostAdapters(self.limits.cpu_loras, self._read)
        self.slots = [_Slot() for _ in range(L)]
        self._clock = 0
        self._loads: list[Callable[[], None]] = []

    def _read(self, req: LoRARequest) -> Adapter:
        """An adapter's weights: those the driver of this process read off the step loop (loader.py), else read from
        its files now (a rank in another process; or evicted there before this rank loaded it)."""
        shared = SHARED.get(shared_key(self.model_dir, req))
        return shared if shared is not None else read_adapter(req, self.limits, self.checkpoint)

    def _piece(self, rows: slice | None, x: int, r: int, k: int, n: int) -> LoRAPiece:
        z = dict(dtype=self.dtype, device=self.device)
        return LoRAPiece(rows, torch.zeros(x, r, k, **z), torch.zeros(x, n, r, **z),
                         torch.zeros(x, dtype=torch.float32, device=self.device))

    def slot_for(self, req: LoRARequest | None, busy: set[int]) -> int:
        """The slot of `req`'s adapter (-1 for none), loading it into a free or least recently used slot outside
        `busy` (the slots the batch's other requests hold)."""
        if req is None:
            return -1
        self._clock += 1
        for i, s in enumerate(self.slots):
            if s.lora_int_id == req.lora_int_id:
                s.last_used = self._clock
                return i
        free = [i for i, s in enumerate(self.slots) if i not in busy]
        if not free:
            raise RuntimeError(f"LoRA adapter {req.lora_name!r}: all max_loras={self.limits.max_loras} slots are "
                               "held by running requests (the scheduler admits no more adapters than slots).")
        i = min(free, key=lambda j: (self.slots[j].lora_int_id != 0, self.slots[j].last_used))
        self._load(i, req)
        return i

    def sync_table(self, table: tuple[LoRARequest | None, ...]) -> None:
        """Hold exactly the driver's slot table (engine/lora/slot_table.py: DP attention, every rank the same), the
        slots that changed written in the next step's device work; the requests' slots then follow the table
        (`slot_of`)."""
        if len(table) != len(self.slots):
            raise RuntimeError(f"LoRA slot table of {len(table)} slots, but this rank holds {len(self.slots)}.")
        self._clock += 1
        for i, req in enumerate(table):
            if req is None:
                if self.slots[i].lora_int_id:
                    self.slots[i] = _Slot()
                    for piece in self.pieces.values():
                        piece.covered.discard(i)
                    self._loads.append(functools.partial(self._write, i, None))
            elif self.slots[i].lora_int_id != req.lora_int_id:
                self._load(i, req)
            self.slots[i].last_used = self._clock

    def slot_of(self, lora_int_id: int) -> int:
        """The slot holding adapter `lora_int_id` (0: the base model, -1)."""
        if not lora_int_id:
            return -1
        for i, s in enumerate(self.slots):
            if s.lora_int_id == lora_int_id:
                return i
        raise RuntimeError(f"LoRA adapter id {lora_int_id} is in no slot of this rank's table.")

    def experts_covered(self) -> bool:
        """Whether a slot's adapter targets routed experts: under EP the tokens then carry their slots in dispatch
        (moe/layer.py), decided from the agreed table, so every rank's dispatch rows are the same width."""
        return any(self.pieces[n].covered for n in self.expert_of)

    def _load(self, i: int, req: LoRARequest) -> None:
        adapter = self.host.get(req)
        missing = sorted(set(adapter.weights) - set(self.pieces))
        if missing:  # the driver's check passed it: this rank's model holds these targets in a form LoRA cannot run
            raise RuntimeError(f"LoRA adapter {req.lora_name!r}: this rank holds no LoRA-able form of {missing[:3]} "
                               "(docs/lora.md#limits); it would run without them.")
        self.slots[i] = _Slot(req.lora_int_id, self._clock)
        for name, piece in self.pieces.items():  # a target no slot's adapter reaches runs no LoRA work
            piece.covered.discard(i)
            if name in adapter.weights:
                piece.covered.add(i)
        self._loads.append(lambda: self._write(i, adapter))

    def _write(self, i: int, adapter: Adapter | None) -> None:
        """Slot i's weights: the adapter's A / B where it targets, zeros elsewhere (a device op; None: all zeros)."""
        for name, piece in self.pieces.items():
            per = self.rows_per_slot[name]
            rows = slice(i * per, (i + 1) * per)
            piece.a_XRK[rows].zero_()
            piece.b_XNR[rows].zero_()
            piece.scale_X[rows] = 0.0
            ab = adapter.weights.get(name) if adapter is not None else None
            if ab is None:
                continue
            a, b = (ab[0][None], ab[1][None]) if per == 1 else ab  # a linear's [r, K] / [N, r], an expert's [E, ..]
            x = self.expert_of.get(name)
            if x is not None:
                a, b = _expert_slices(name, a, b, x)
            t = self.targets.get(name)
            if t is not None and t.row_sel is not None:  # B's rows: the checkpoint rows this linear holds
                b = b[:, t.row_sel]
            if t is not None and t.col_sel is not None:  # A's columns: a row-parallel shard's input
                a = a[:, :, t.col_sel]
            r = a.shape[1]
            piece.a_XRK[rows, :r].copy_(a)
            piece.b_XNR[rows, :, :r].copy_(b)
            piece.scale_X[rows] = adapter.scales[name]

    def take_loads(self) -> list[Callable[[], None]]:
        """The slot writes owed since the last call, for the step's device work to run first."""
        loads, self._loads = self._loads, []
        return loads

    def token_slots(self, slots_S: list[int], query_lens: list[int]) -> np.ndarray | None:
        """Each token's slot for a step of these sequences; None when no row has an adapter (no LoRA work)."""
        if all(s < 0 for s in slots_S):
            return None
        return np.repeat(np.asarray(slots_S, dtype=np.int64), query_lens)

    def rows_cover_experts(self, slots_S: list[int]) -> bool:
        """Whether an adapter of these rows' slots targets routed experts (the step then runs the experts' LoRA
        path: in a decode graph only on a backend whose path has no host loop, engine/lora/experts.py `in_graphs`)."""
        used = {s for s in slots_S if s >= 0}
        return any(used & self.pieces[n].covered for n in self.expert_of)

    def begin_step(self, slots_T: np.ndarray | None, carry: bool = False, experts: bool = False) -> None:
        """Set the forward's per-token slots (a device op: the step's inputs), whether its dispatch carries them
        (EP: `experts_covered` of the agreed table, read when the step was launched) and whether a row's adapter
        targets routed experts (`rows_cover_experts`)."""
        self.step.slots_T = None if slots_T is None else to_device(slots_T, torch.long, self.device)
        self.step.carry, self.step.experts = carry, experts

    @contextlib.contextmanager
    def captured(self, slots_T: torch.Tensor) -> Iterator[None]:
        """The forward a decode graph captures (engine/rank/cuda_graph.py): the hooks read `slots_T`, the graph's
        static per-token slot buffer (the runner writes each replay's slots there first; padding rows -1), and every
        linear piece runs (LoRAStep.captured). The slots' A / B / scales are fixed device tensors written in place
        (`_write`), so an adapter loaded into a slot after the capture is what the next replay reads."""
        step = self.step
        step.slots_T, step.captured, step.carry, step.experts = slots_T, True, False, False
        try:
            yield
        finally:
            step.slots_T, step.captured = None, False


def _expert_slices(name: str, a_GrK: torch.Tensor, b_GNr: torch.Tensor, x: ExpertTarget
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert tensor's A [G, r, K] / B [G, N, r] (all G experts, as stored) cut to what this rank holds: its local
    experts' rows (EP, redundant copies repeated), and under TP its intermediate channels: gate_up's B rows of gate
    [i0, i0 + w) and of up [I + i0, I + i0 + w) (column-parallel), down's A columns [i0, i0 + w) (row-parallel: the
    delta is a partial sum, all-reduced with the experts' output)."""
    if x.experts is not None:
        idx = torch.as_tensor(x.experts, dtype=torch.long)
        a_GrK, b_GNr = a_GrK.index_select(0, idx), b_GNr.index_select(0, idx)
    if x.shard is not None:
        i0, whole = x.shard
        w = x.i
        if name.endswith("gate_up_proj"):
            b_GNr = torch.cat([b_GNr[:, i0:i0 + w], b_GNr[:, whole + i0:whole + i0 + w]], dim=1)
        else:
            a_GrK = a_GrK[:, :, i0:i0 + w]
    return a_GrK, b_GNr
