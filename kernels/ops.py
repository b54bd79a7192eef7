"""One selector for the kernel implementations a device runs (DESIGN.md: Interfaces).

`Kernels` is a strategy object: the model calls `kernels.rms_norm(...)` and
never asks which implementation it got. `ReferenceKernels` is plain torch (the
CPU path and the test oracle).
"""
from __future__ import annotations

import torch

from .attention import AttentionMetadata, reference_paged_attention, reference_write_kv
from .moe import reference_fused_moe
from .norm import reference_add_rms_norm, reference_rms_norm
from .rotary import reference_rotary


class ReferenceKernels:
    """Plain-torch implementations; correct on any device, fast enough on CPU."""

    name = "reference"

    rms_norm = staticmethod(reference_rms_norm)
    add_rms_norm = staticmethod(reference_add_rms_norm)
    rotary = staticmethod(reference_rotary)
    write_kv = staticmethod(reference_write_kv)
    paged_attention = staticmethod(reference_paged_attention)
    fused_moe = staticmethod(reference_fused_moe)


_BACKENDS = {"reference": ReferenceKernels}


def select_kernels(device: torch.device, name: str = "auto"):
    """Pick the kernel backend: `auto` is Triton on CUDA when available, references elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and "triton" in _BACKENDS else "reference"
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not available: choose from {sorted(_BACKENDS)} or 'auto'.")
    return _BACKENDS[name]()


__all__ = ["AttentionMetadata", "ReferenceKernels", "select_kernels"]
