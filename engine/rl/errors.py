"""The refusals of the RL control calls (docs/rl.md), one class each so that a server answers each with its own
status (engine/server/serving.py, engine/server/gateway/rl_routes.py), and the check behind ControlDisabled.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config.engine_args import EngineConfig


class ControlDisabled(ValueError):
    """A control call on an engine started without enable_weight_updates (a server answers FAILED_PRECONDITION)."""


class GroupJoinFailed(ValueError):
    """A join of a trainer's group failed or ran past its join_timeout_s: the address the caller gave led to no
    trainer (a server answers 400 / INVALID_ARGUMENT naming why); every rank dropped its end."""


class NotServing(RuntimeError):
    """A request refused while the engine is asleep or its weights are incomplete (a server answers UNAVAILABLE)."""


def check_enabled(config: EngineConfig, call: str) -> None:
    """The control calls that change weights or hold requests are taken only when the engine was started to."""
    if not config.enable_weight_updates:
        raise ControlDisabled(f"{call} is refused: start the engine with enable_weight_updates=True "
                              "(--enable-weight-updates) to take RL control calls.")
