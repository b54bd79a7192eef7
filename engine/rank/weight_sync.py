"""A rank's end of a trainer's weight broadcast (engine/contract/weight_sync.py; docs/rl.md): the groups it joined,
by name, and the receive of one update, a bucket at a time, each bucket written in place through the rank's load plan
(loader.update_tensors_in_place: its experts, its TP slice; nothing else is kept).

Failures are answered, not raised (a raised error is a rank's death to the Ray executor): a trainer that dies or
stays silent past the group's timeout fails the tensor being received, named, and the group is dropped (a gloo or
NCCL group that failed once is not reused); the buckets written before it stay written, and the driver refuses to
serve until a complete update lands (engine/core/rl_control.py).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from moelink.comm.process_group import side_group

from ..config.requantize import requantize
from ..contract.weight_sync import DistributedUpdate, DistributedUpdateResult, UpdateGroupSpec

logger = logging.getLogger(__name__)

WriteBucket = Callable[[dict[str, torch.Tensor]], int]  # a bucket's tensors written in place; the bytes read


class UpdateGroups:
    """The trainer groups one rank has joined, by group name."""

    def __init__(self, device: torch.device):
        self.device = device
        self._groups: dict[str, tuple] = {}  # name -> (backend group, its store, spec)

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
        before the next is received."""
        entry = self._groups.get(update.group_name)
        if entry is None:
            return DistributedUpdateResult(0, 0, f"group_name={update.group_name!r} is not a joined group.")
        group = entry[0]
        on = self.device if entry[2].backend == "nccl" else torch.device("cpu")
        received = written = 0
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
                    return DistributedUpdateResult(
                        received, written, f"receiving tensor {name!r} from group {update.group_name!r} failed "
                        f"({type(exc).__name__}: {str(exc)[:200]}); the group is destroyed")
                received += buf.numel() * buf.element_size()
                tensors[name] = buf
            try:
                for name, spec in update.requantize:  # a float weight the checkpoint holds quantized
                    if name in tensors:
                        tensors.update(requantize(name, spec, tensors.pop(name)))
                write(tensors)
            except Exception as exc:
                return DistributedUpdateResult(received, written, f"writing {sorted(tensors)[0]!r} failed: {exc}")
            written += len(tensors)
            del tensors  # the bucket goes before the next is received
        return DistributedUpdateResult(received, written)


__all__ = ["UpdateGroups"]
