"""Host lists and arrays onto a device, and device tensors back, without making the host wait for the device.

Every floor that builds a step's inputs or reads its outputs uses these (the rank's input batch and sampler, the
per-sequence state plans of engine/state, speculative decoding's verify step): one definition of how a copy avoids
a host sync (pinned memory and a non-blocking copy on CUDA; a pageable copy would synchronise the stream), as is
on the CPU. Pure functions: no stream, no device held.
"""
from __future__ import annotations

import numpy as np
import torch


def to_device(array, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host array or list on `device` without making the host wait for the device: from pinned memory with a
    non-blocking copy on CUDA (a pageable copy would synchronise the stream), as is on the CPU."""
    t = torch.as_tensor(np.asarray(array), dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy in (pinned) host memory, enqueued without a wait: read it after the step's
    DeviceWork.wait()."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


__all__ = ["to_device", "to_host"]
