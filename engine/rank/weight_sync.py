"""A rank's end of a trainer's weight broadcast (engine/contract/weight_sync.py; docs/rl.md): the groups it joined,
by name, and the receive of one update, a bucket at a time, each bucket written in place through the rank's load plan
(loader.update_tensors_in_place: its experts, its TP slice; nothing else is kept).

Failures are answered, not raised (a raised error is a rank's death to the Ray executor). Before a bucket is written,
the bytes it overwrites are saved to the update's undo log (engine/rank/rollback.py, at most `rollback_bytes`); a
failed update restores them, so the weights are bitwise as before: a trainer that dies or stays silent past the
group's timeout (the tensor being received is named, and the group is dropped: a gloo or NCCL group that failed once
is not reused), or a bucket that cannot be written (a NaN, the undo log's limit: the rest of the broadcast is received
and dropped, and the group stays). A rank that wrote everything keeps its log until the driver's `finish`: it rolls
back too when another rank failed (engine/core/rl_control.py). With `rollback_bytes=0` the buckets written before a
failure stay written, and the driver refuses to serve until a complete update lands.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

import torch

from moelink.comm.process_group import side_group

from ..config.requantize import requantize
from ..contract.weight_sync import DistributedUpdate, DistributedUpdateResult, UpdateGroupSpec
from .rollback import UndoLog, finish, roll_back

logger = logging.getLogger(__name__)

# a bucket's tensors written in place, the bytes they overwrite saved to the undo log first (None: no rollback)
WriteBucket = Callable[[dict[str, torch.Tensor], "UndoLog | None"], int]


class UpdateGroups:
    """The trainer groups one rank has joined, by group name."""

    def __init__(self, device: torch.device):
        self.device = device
        self._groups: dict[str, tuple] = {}  # name -> (backend group, its store, spec)
        self._pending: UndoLog | None = None  # the last update's undo log, until the driver's finish

    def join(self, spec: UpdateGroupSpec, rank: int) -> str | None:
        """Join `spec`'s group as rank_offset + `rank`; None, or why it failed."""
        if spec.group_name in self._groups:
            return f"group_name={spec.group_name!r} is already joined: destroy it first."
        if spec.backend == "nccl" and self.device.type != "cuda":
            return f"backend='nccl' is invalid on a {self.device.type} rank: use 'gloo'."
        try:
            group, store = side_group(spec.master_address, spec.master_port, spec.rank_offset + rank, spec.world_size,
                                      spec.group_name, spec.backend, spec.timeout_s, self.device)
        except Exception as exc:  # the trainer's rendezvous never came: the caller's error, not this rank's death
            return f"joining group {spec.group_name!r} at {spec.master_address}:{spec.master_port} failed: {exc}"
        self._groups[spec.group_name] = (group, store, spec)
        return None

    def destroy(self, group_name: str) -> bool:
        """Leave the group; False when this rank had not joined it."""
        return self._groups.pop(group_name, None) is not None

    def receive(self, update: DistributedUpdate, write: WriteBucket) -> DistributedUpdateResult:
        """Every tensor of `update` from the trainer's broadcast, a bucket at a time, each bucket handed to `write`
        (with the undo log it saves the overwritten bytes to first) before the next is received. A bucket that
        cannot be written (a NaN, a tensor its format cannot take, the undo log's limit) fails the update: what was
        written is restored at once, and the rest of the broadcast is received and dropped, so the trainer's
        broadcast ends and the group stays usable. A trainer that dies fails it too, and the group is left."""
        self._pending = None
        entry = self._groups.get(update.group_name)
        if entry is None:
            return DistributedUpdateResult(0, 0, f"group_name={update.group_name!r} is not a joined group.")
        group = entry[0]
        on = self.device if entry[2].backend == "nccl" else torch.device("cpu")
        undo = UndoLog(update.rollback_bytes) if update.rollback_bytes else None
        received = written = 0
        failure: str | None = None
        failed: DistributedUpdateResult | None = None
        for bucket in update.buckets():
            tensors: dict[str, torch.Tensor] = {}
            for i in bucket:
                name, dtype, shape = update.tensors[i]
                buf = torch.empty(shape, dtype=dtype, device=on)
                try:
                    group.broadcast(buf, 0).wait()
                except Exception as exc:  # the trainer died or went silent: this group is done
                    self.destroy(update.group_name)
                    logger.warning("weight update from group %r failed at tensor %r: %s", update.group_name, name, exc)
                    why = failure or (f"receiving tensor {name!r} from group {update.group_name!r} failed "
                                      f"({type(exc).__name__}: {str(exc)[:200]}); the group is destroyed")
                    return self._failed(undo, received, written, why, group_lost=True)
                received += buf.numel() * buf.element_size()
                if failure is None:  # after a failure the rest is received and dropped (the trainer's broadcast ends)
                    tensors[name] = buf
            if failure is not None:
                continue
            try:
                _check_nan(tensors, {n for n, _ in update.requantize})
                for name, spec in update.requantize:  # a float weight the checkpoint holds quantized
                    if name in tensors:
                        tensors.update(requantize(name, spec, tensors.pop(name)))
                write(tensors, undo)
                written += len(tensors)
            except Exception as exc:
                failed = self._failed(undo, received, written, f"writing the bucket of {sorted(tensors)[0]!r} failed: "
                                                                   f"{exc}", group_lost=False)
                failure = failed.error
            del tensors  # the bucket goes before the next is received
        if failed is not None:
            return replace(failed, bytes_received=received)
        self._pending = undo
        return DistributedUpdateResult(received, written)

    def finish(self, commit: bool) -> str | None:
        """The driver's word on the last update, once every rank answered: keep it, or restore the bytes it
        overwrote (another rank failed). None, or why the restore failed."""
        undo, self._pending = self._pending, None
        return finish(undo, commit)

    @staticmethod
    def _failed(undo: UndoLog | None, received: int, written: int, why: str,
                group_lost: bool) -> DistributedUpdateResult:
        """Roll this rank back at once (where it keeps an undo log); the answer naming why."""
        error = roll_back(undo)
        rolled = undo is not None and error is None
        if error is not None:
            why = f"{why}; {error}"
        return DistributedUpdateResult(received, written, why, rolled_back=rolled, group_lost=group_lost)


def _check_nan(tensors: dict[str, torch.Tensor], requantized: set[str]) -> None:
    """Every rank checks every float tensor it received (also those it does not keep), so all ranks fail the same
    bucket: a NaN or inf weight would answer garbage. Re-quantized ones are checked by their format (requantize)."""
    for name, t in tensors.items():
        if name not in requantized and t.is_floating_point() and t.dtype != torch.float8_e4m3fn \
                and not bool(torch.isfinite(t).all()):  # host sync: an update-time check (inf too, as the loader)
            nan = int(torch.isnan(t).sum())
            what = f"{nan} NaN value(s)" if nan else f"{int(torch.isinf(t).sum())} infinite value(s)"
            raise ValueError(f"tensor {name!r} holds {what} of {t.numel()}.")


__all__ = ["UpdateGroups"]
