"""The structured-output step plug-in (engine/contract/step_plugin.py): a step whose scheduler output carries
grammar bitmasks (the driver's, one per constrained request: allowed tokens as little-endian packed bits) hands them
to its sampling rows, a verify step's too (engine/spec/verify.py masks each verified position); a step without any
plans nothing."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..contract.step_plugin import RankModel, StepBatch, StepPlugin, StepWork

if TYPE_CHECKING:
    from ..config.worker_config import WorkerConfig


class _Masks(StepWork[None]):
    def __init__(self, token_masks: dict[str, bytes]):
        self.token_masks = token_masks


class GrammarPlugin(StepPlugin):
    """Planned only while the rank holds a constrained request (`wakes_on`)."""

    name = "grammar"
    wakes_on = "structured_outputs"

    def plan(self, batch: StepBatch) -> StepWork | None:
        masks = batch.so.grammar_bitmask
        return _Masks(masks) if masks else None


class GrammarFeature:
    """Every engine takes the requests' grammars (the driver compiles them and refuses what it cannot)."""

    name = GrammarPlugin.name

    def make(self, rank: RankModel, config: WorkerConfig) -> StepPlugin | None:
        return GrammarPlugin()


FEATURE = GrammarFeature()
