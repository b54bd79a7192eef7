"""A rank's step plug-ins (engine/contract/step_plugin.py) as the runner calls them: per point of the step, the
plug-ins that act there, so a point no plug-in uses costs no call.

A plug-in that wakes on a request field (`StepPlugin.wakes_on`: prompt logprobs, given routing, a grammar) hears of
the requests that set it alone, and plans a step only while the rank holds one: a step of requests that asked for
none of them calls none of them (no call, no per-sequence check: the field is read once, when a request joins).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from ..contract.step_plugin import GraphTokenInput, HeldRequest, StepBatch, StepPlugin, StepWork, overrides

if TYPE_CHECKING:
    from moelink.scheduler.outputs import ModelRunnerOutput, NewRequestData, SchedulerOutput


class PluginSet:
    def __init__(self, plugins: Sequence[StepPlugin]):
        self.plugins: tuple[StepPlugin, ...] = tuple(plugins)
        names = [p.name for p in self.plugins]
        if len(set(names)) != len(names):
            raise ValueError(f"step plug-ins {names} name one feature twice.")

        def acting(hook: str, among: Sequence[StepPlugin]) -> tuple[StepPlugin, ...]:
            return tuple(p for p in among if overrides(p, StepPlugin, hook))
        always = [p for p in self.plugins if p.wakes_on is None]
        self._waking = [p for p in self.plugins if p.wakes_on is not None]
        self._fields = [p.wakes_on or "" for p in self._waking]
        self.before_step = acting("before_step", self.plugins)
        self._admit, self._release = acting("admit", always), acting("release", always)
        self._planners, self.idle_planners = acting("plan", always), acting("plan_idle", self.plugins)
        self.collectors: tuple[Callable[[ModelRunnerOutput], None], ...] = tuple(
            p.collect for p in acting("collect", self.plugins))
        # request ids held per waking plug-in (by its index in _waking): it plans only while some are held
        self._woken: list[set[str]] = [set() for _ in self._waking]
        inputs = [i for p in self.plugins if (i := p.graph_input()) is not None]
        if len(inputs) > 1:
            raise ValueError(f"step plug-ins {names} give a decode graph {len(inputs)} per-token inputs; it takes one.")
        self.graph_input: GraphTokenInput | None = inputs[0] if inputs else None

    def get(self, name: str) -> StepPlugin | None:
        return next((p for p in self.plugins if p.name == name), None)

    def admit(self, new: NewRequestData, state: HeldRequest) -> None:
        for p in self._admit:
            p.admit(new, state)
        params = new.sampling_params
        for p, field, held in zip(self._waking, self._fields, self._woken):
            value = getattr(params, field, None)
            if value is not None and value is not False:  # by identity: a field may hold an array
                held.add(new.req_id)
                p.admit(new, state)

    def release(self, req_id: str, preempted: bool) -> None:
        for p in self._release:
            p.release(req_id, preempted)
        for p, held in zip(self._waking, self._woken):
            if req_id in held:
                held.discard(req_id)
                p.release(req_id, preempted)

    def reset(self) -> None:
        for p in self.plugins:
            p.reset()
        for held in self._woken:
            held.clear()

    def plan(self, batch: StepBatch) -> list[StepWork]:
        works = [w for p in self._planners if (w := p.plan(batch)) is not None]
        for p, held in zip(self._waking, self._woken):
            if held and (w := p.plan(batch)) is not None:
                works.append(w)
        return works

    def plan_idle(self, so: SchedulerOutput, runs: bool) -> list[StepWork]:
        return [w for p in self.idle_planners if (w := p.plan_idle(so, runs)) is not None]

    def close(self) -> None:
        for p in self.plugins:
            p.close()


__all__ = ["PluginSet"]
