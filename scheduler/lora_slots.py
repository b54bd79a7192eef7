"""Which waiting requests wait for a LoRA slot this step (scheduler.max_loras adapters at most run at once).

The FCFS loop of `Scheduler.schedule` asks `LoRASlotWait.waits(req)` of each waiting request with an adapter: the
ones that would need a slot while every slot is held are taken off the queue's front and put back after the loop,
so the requests behind them that need no new slot (the base model's, a resident adapter's) go on in order, as vLLM
skips them too. Before this a request waiting for a slot blocked the whole queue (issue 76 item 5).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .config import SchedulerConfig
from .request import Request

# Requests waiting for a LoRA slot one step looks past (and puts back): the scan's bound per step.
MAX_LORA_SKIPS = 4096


@dataclass
class LoRAOvertakes:
    """Kept by the scheduler across steps: the request that first waited for a slot, and how many requests of
    running adapters overtook it since (LoRASlotWait bounds them by max_num_seqs)."""

    request_id: str = ""
    count: int = 0


class LoRASlotWait:
    """One step's view of the LoRA slots for the waiting queue (scheduler.max_loras adapters at most run at once).

    A request whose adapter is not running while every slot is held waits (skipped, kept in order); requests behind
    it that need no new slot go on: the base model's always, a running adapter's as long as the first request
    waiting for a slot has been overtaken fewer than max_num_seqs times by them. Past that bound a running adapter's
    new requests wait behind it too, so that adapter drains and its slot goes to the waiting one, first come first
    served among adapters (without the bound an adapter kept busy would hold its slot forever)."""

    def __init__(self, running: Iterable[Request], config: SchedulerConfig, overtakes: LoRAOvertakes):
        self.config = config
        self.overtakes = overtakes
        self.running = {r.lora_id for r in running if r.lora_id}
        self.first: Request | None = None  # the first request skipped this step for want of a slot

    def waits(self, req: Request) -> bool:
        if req.lora_id not in self.running:
            if len(self.running) < self.config.max_loras:
                return False  # a free slot: the first of the waiting adapters' requests (in order) takes it
            if self.first is None:
                self.first = req
                if self.overtakes.request_id != req.request_id:
                    self.overtakes.request_id, self.overtakes.count = req.request_id, 0
            return True
        if self.first is None:
            return False
        if self.overtakes.count >= self.config.max_num_seqs:
            return True  # the waiting adapter's turn: this running adapter drains
        self.overtakes.count += 1
        return False
