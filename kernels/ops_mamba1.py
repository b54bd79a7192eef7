"""The Mamba1 family of the kernel seam (kernels/ops.py): the selective scan of Mamba1 layers (Jamba's;
engine/models/mamba1.py). Its short convolution is the gated-DeltaNet family's causal_conv1d (with a bias), as
Mamba2's.

References in kernels/mamba1.py; Triton in kernels/triton_mamba1.py (one recurrent kernel: decode, verify, replay,
and prefill token by token), imported only when a Triton backend is built. mamba_ssm's selective-scan CUDA kernels
are extras not wired here. Legend: T tokens, I channels, K state size, P state slots, S sequences.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .mamba1 import reference_mamba1_decode, reference_mamba1_replay, reference_mamba1_scan


class Mamba1Kernels(Protocol):
    def mamba1_scan(self, x_TI: torch.Tensor, dt_TI: torch.Tensor, B_TK: torch.Tensor, C_TK: torch.Tensor,
                    A_log_IK: torch.Tensor, D_I: torch.Tensor, dt_bias_I: torch.Tensor, state_pool_PIK: torch.Tensor,
                    query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
                    has_initial_state_S: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill (any lengths): y_TI with D's skip, no gate; each sequence's last state written back to its slot."""
        ...

    def mamba1_decode(self, x_TI: torch.Tensor, dt_TI: torch.Tensor, B_TK: torch.Tensor, C_TK: torch.Tensor,
                      A_log_IK: torch.Tensor, D_I: torch.Tensor, dt_bias_I: torch.Tensor,
                      state_pool_PIK: torch.Tensor, query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
                      update_state: bool = True) -> torch.Tensor:
        """Decode and verify from each slot's state; update_state=False leaves the pool untouched (verify)."""
        ...

    def mamba1_replay(self, x_TI: torch.Tensor, dt_TI: torch.Tensor, B_TK: torch.Tensor, C_TK: torch.Tensor,
                      A_log_IK: torch.Tensor, D_I: torch.Tensor, dt_bias_I: torch.Tensor,
                      state_pool_PIK: torch.Tensor, query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
                      num_accepted_S: torch.Tensor) -> None:
        """After a verify step that left the pool untouched: each slot advances over its accepted tokens."""
        ...


_REFERENCES = dict(mamba1_scan=reference_mamba1_scan, mamba1_decode=reference_mamba1_decode,
                   mamba1_replay=reference_mamba1_replay)


def _triton() -> dict[str, Any]:
    from .triton_mamba1 import triton_mamba1_decode, triton_mamba1_replay, triton_mamba1_scan

    return dict(mamba1_scan=triton_mamba1_scan, mamba1_decode=triton_mamba1_decode, mamba1_replay=triton_mamba1_replay)


registry.register("mamba1", Mamba1Kernels, triton=_triton, reference=_REFERENCES)
