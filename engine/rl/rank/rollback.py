"""A weight update's undo log on one rank (docs/rl.md, "Rolling back"): before a bucket of a trainer's broadcast is
written, the bytes it will overwrite (the load plan's destinations of its names, this rank's parts only: its experts,
its TP slice) are copied to host memory; a failed update restores them, last saved first, so every destination holds
again exactly the bytes it held (converted values included: a zero-centred norm's offset, MLA's folded scales are
in the saved bytes, and nothing is converted again).

The log holds at most `limit` bytes: a bucket that would pass it fails before any of its bytes is written, and the
update is rolled back. The driver asks every rank first what the whole update would hold (`old_bytes`) and refuses
it before anything is written or broadcast, so the limit is met here only if a rank's plan changed between the two.
It lives until the driver commits or rolls back the update on every rank (`finish`: engine/rl/rank/weight_sync.py for a
trainer's broadcast, engine/rl/rank/worker.py for an update from disk), so a rank that wrote everything can still undo
it when another rank failed.
"""
from __future__ import annotations

from typing import Any

import torch

from moelink.moe.expert_weights import QuantizeOnLoad


def _targets(name: str, entry) -> list[tuple[torch.Tensor, Any]]:
    """(tensor, index) of each place a plan entry writes: a parameter (at its index), an FP8 weight and its block
    scales (QuantizeOnLoad), or a piece's destination (`dest`, or its target's: Rearranged, Repack, the NVFP4 / INT4 /
    FP8 dequantizing pieces)."""
    param, idx = entry[0], entry[1]
    if isinstance(param, QuantizeOnLoad):
        return [(param.weight, idx), (param.scale, param.scale_index)]
    if isinstance(param, torch.Tensor):
        return [(param, idx)]
    dest = getattr(getattr(param, "target", param), "dest", None)
    if isinstance(dest, torch.Tensor):
        return [(dest, ())]
    raise ValueError(f"tensor {name!r} is written through a {type(param).__name__}, whose bytes cannot be saved to "
                     "roll back: update with rollback_bytes=0.")


def _key(tensor: torch.Tensor, idx) -> tuple:
    """The place a (tensor, index) names, by its storage (a piece's view is a new object each bucket's plan)."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            repr(idx))


def _places(plan: dict):
    """(key, tensor, index, the part written) of every place `plan`'s entries write."""
    for name, entry in plan.items():
        for tensor, idx in _targets(name, entry):
            yield _key(tensor, idx), tensor, idx, (tensor[idx] if idx else tensor)


def old_bytes(plan: dict) -> int:
    """The bytes an undo log of `plan` holds (each place once), nothing copied or read: the driver's check of
    rollback_bytes before an update starts. Sized on the meta device, so a rank asleep (its weights' storage given
    back) answers too."""
    seen: dict[tuple, int] = {}
    for name, entry in plan.items():
        for tensor, idx in _targets(name, entry):
            # asleep, every released storage is at address 0: told apart by the tensor (a tied weight then counts twice)
            key = _key(tensor, idx) if tensor.untyped_storage().data_ptr() else (id(tensor), repr(idx))
            seen[key] = _part_bytes(tensor, idx)
    return sum(seen.values())


def _part_bytes(tensor: torch.Tensor, idx) -> int:
    shape_like = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if idx:
        shape_like = shape_like[tuple(i.to("meta") if isinstance(i, torch.Tensor) else i for i in idx)]
    return shape_like.numel() * shape_like.element_size()


class UndoLog:
    """The bytes an update overwrote on this rank, in host memory, in the order saved."""

    def __init__(self, limit: int):
        self.limit = limit
        self.nbytes = 0
        self._saved: list[tuple[torch.Tensor, Any, torch.Tensor]] = []  # (tensor, index, its old values on host)
        self._seen: set[tuple] = set()

    def save(self, plan: dict) -> None:
        """Copy what `plan`'s entries will overwrite (each place once). Raises ValueError, saving nothing of this
        plan, when the log would pass its limit."""
        todo = []
        size = 0
        for key, tensor, idx, part in _places(plan):
            if key in self._seen:
                continue
            self._seen.add(key)
            todo.append((tensor, idx, part))
            size += part.numel() * part.element_size()
        if self.nbytes + size > self.limit:
            for tensor, idx, _ in todo:
                self._seen.discard(_key(tensor, idx))
            raise ValueError(f"rolling this update back would hold {self.nbytes + size} bytes of old weights on this "
                             f"rank, more than rollback_bytes={self.limit}: split the update into smaller calls, or "
                             "raise rollback_bytes (0: no rollback).")
        with torch.no_grad():
            for tensor, idx, part in todo:
                self._saved.append((tensor, idx, part.detach().to("cpu", copy=True)))
        self.nbytes += size

    def restore(self) -> None:
        """Every saved place back to its old bytes, last saved first (so a place saved twice ends at its oldest)."""
        with torch.no_grad():
            for tensor, idx, old in reversed(self._saved):
                if idx:
                    tensor[idx] = old.to(tensor.device)
                else:
                    tensor.copy_(old.to(tensor.device))
        self.clear()

    def clear(self) -> None:
        self._saved.clear()
        self._seen.clear()
        self.nbytes = 0


def roll_back(undo: "UndoLog | None") -> str | None:
    """Restore what `undo` saved (None: no rollback, nothing to do); None, or why the restore failed (the weights
    are then of two versions: the driver stops serving)."""
    if undo is None:
        return None
    try:
        undo.restore()
    except Exception as exc:
        return f"restoring the old weights failed: {exc}"
    return None


def finish(undo: "UndoLog | None", commit: bool) -> str | None:
    """The driver's word on an update every rank answered: keep it (the log dropped) or restore the old bytes
    (another rank failed); None, or why the restore failed."""
    if undo is not None and commit:
        undo.clear()
        return None
    return roll_back(undo)


__all__ = ["UndoLog", "finish", "old_bytes", "roll_back"]
