"""The driver's adapter slot table under DP attention (several schedulers: EP): one table every rank holds, so that a
slot id means the same adapter on every rank. A token dispatched to another rank's experts carries its slot id
(moe/layer.py), and the receiving rank applies that slot's per-expert A / B: its own requests' slots would name other
adapters there.

Each step the driver puts the adapters of every request it schedules, on any rank, in the table (an adapter already
there keeps its slot; a new one takes an empty slot, else the least recently used one no request of this step needs)
and sends every rank the same snapshot (SchedulerOutput.lora_table); each rank loads the slots that changed
(engine/lora/slots.py `LoRASlots.sync_table`). Each scheduler runs at most `max_loras` adapters at once, so a table of
`world · max_loras` slots always has room for a step's adapters.
"""
from __future__ import annotations

from ..contract.lora import LoRARequest


class SlotTable:
    """`size` slots of adapters, agreed by every rank through the snapshot each step carries."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"SlotTable size={size!r} is invalid: must be >= 1.")
        self.slots: list[LoRARequest | None] = [None] * size
        self._last_used = [0] * size
        self._clock = 0

    def assign(self, needed: list[LoRARequest]) -> tuple[LoRARequest | None, ...]:
        """The table with every adapter of `needed` (this step's, over all ranks) in a slot: the snapshot to send."""
        self._clock += 1
        ids = {r.lora_int_id for r in needed}
        held = {s.lora_int_id: i for i, s in enumerate(self.slots) if s is not None}
        for i in (held[x] for x in ids if x in held):
            self._last_used[i] = self._clock
        for req in needed:
            if req.lora_int_id in held:
                continue
            free = [i for i, s in enumerate(self.slots) if s is None or s.lora_int_id not in ids]
            if not free:  # the schedulers' max_loras each bound a step's adapters to the table's size
                raise RuntimeError(f"LoRA slot table: {len(ids)} adapters in one step, over its {len(self.slots)} "
                                   "slots (world x max_loras).")
            i = min(free, key=lambda j: (self.slots[j] is not None, self._last_used[j]))
            self.slots[i], self._last_used[i] = req, self._clock
            held[req.lora_int_id] = i
        return tuple(self.slots)
