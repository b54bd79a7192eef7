"""Which served tensors no update has written since they were lost (docs/rl.md): a broadcast that failed part way
without a rollback, or sleep(level=2), which drops every weight. Until an update writes them all the engine refuses
requests (`check`): it never serves a model of two versions. One object, shared by the RL control calls
(engine/rl/control.py) and the memory control (engine/rl/memory.py), which both mark tensors stale.
"""
from __future__ import annotations

from .errors import NotServing


class StaleWeights:
    """The stale tensors' names and why they are stale, or nothing (the weights are whole)."""

    def __init__(self) -> None:
        # (the stale names, why) or None: whole. Read by the admission check.
        self.state: tuple[set[str], str] | None = None

    def __bool__(self) -> bool:
        return self.state is not None

    def add(self, names: set[str], why: str) -> None:
        """`names` are stale too; `why` is the latest reason (the one a refusal names)."""
        self.state = ((self.state[0] if self.state else set()) | names, why)

    def written(self, names: set[str]) -> None:
        """An update wrote `names`: fewer are stale (none: serve again)."""
        if self.state is not None:
            left = self.state[0] - names
            self.state = (left, self.state[1]) if left else None

    def clear(self) -> None:
        """An update wrote every served tensor."""
        self.state = None

    def check(self) -> None:
        """Refuse a request while a tensor is stale, naming one and why."""
        if self.state is not None:
            left, why = self.state
            raise NotServing(f"requests are refused: {why}; {len(left)} tensor(s) (e.g. {sorted(left)[0]!r}) are "
                             "still to be written by a complete update (update_weights_from_disk, or the same names "
                             "again).")
