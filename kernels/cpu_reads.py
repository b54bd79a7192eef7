"""Host reads in the plain-torch kernels' CPU-only branches (a decode group's stale positions, whether a step has
padding slots): on a CPU reading a tensor's values waits for nothing, and these branches never run on another
device (each checks `device.type == "cpu"` first), so they are not the device→host syncs the overlapped loop
must avoid.

The unbound methods are taken at import, before a test's sync counter (tests/helpers/host_syncs.py) wraps
torch.Tensor's to find what would wait on a GPU: a branch that cannot run on one is not counted. Each read
refuses a tensor off the CPU, so nothing can slip a real sync through here.
"""
from __future__ import annotations

import torch

_NONZERO = torch.Tensor.nonzero
_ITEM = torch.Tensor.item


def _cpu(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.device.type != "cpu":
        raise RuntimeError(f"kernels.cpu_reads.{what} reads a CPU tensor only (got one on {t.device}): on another "
                           "device it would be a device→host sync.")
    return t


def cpu_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the true entries of a 1-D CPU bool tensor, [n] int64."""
    return _NONZERO(_cpu(mask, "cpu_nonzero")).squeeze(1)


def cpu_item(t: torch.Tensor):
    """The Python value of a one-element CPU tensor."""
    return _ITEM(_cpu(t, "cpu_item"))


__all__ = ["cpu_item", "cpu_nonzero"]
