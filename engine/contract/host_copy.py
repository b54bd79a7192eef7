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
    np_dtype = _NUMPY_DTYPES.get(dtype)
    a = np.asarray(array, dtype=np_dtype) if np_dtype is not None else None
    # torch.from_numpy wraps the array in ~0.7 us where as_tensor takes 2-6 us (a step makes ~10 of these); the same
    # sharing as as_tensor's (an array of the dtype is not copied, a list is converted once).
    t = torch.from_numpy(a) if a is not None and a.flags.writeable else torch.as_tensor(np.asarray(array), dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.float64: np.float64,
                 torch.bool: np.bool_, torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8}


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy in (pinned) host memory, enqueued without a wait: read it after the step's
    DeviceWork.wait()."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


__all__ = ["to_device", "to_host"]
