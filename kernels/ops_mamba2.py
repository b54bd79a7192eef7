"""The Mamba2 family of the kernel seam (kernels/ops.py): the selective state-space scan of Mamba2 layers (Granite
4.0-H; engine/models/mamba2.py). Its short convolution is the gated-DeltaNet family's causal_conv1d (with a bias).

References in kernels/mamba2.py; Triton in kernels/triton_mamba2.py (one recurrent kernel: decode, verify, replay,
and prefill token by token), imported only when a Triton backend is built. mamba_ssm's chunked-scan kernels (the fast
prefill for long prompts) are CUDA-only extras not wired here. Legend: T tokens, N heads, H head dim, G groups, K state size, P state slots,
S sequences.
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from . import registry
from .mamba2 import reference_mamba2_decode, reference_mamba2_replay, reference_mamba2_scan


class Mamba2Kernels(Protocol):
    def mamba2_scan(self, x_TNH: torch.Tensor, dt_TN: torch.Tensor, B_TGK: torch.Tensor, C_TGK: torch.Tensor,
                    A_log_N: torch.Tensor, D_N: torch.Tensor, dt_bias_N: torch.Tensor,
                    state_pool_PNHK: torch.Tensor, query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
                    has_initial_state_S: torch.Tensor | None = None, dt_min: float = 0.0,
                    dt_max: float = math.inf) -> torch.Tensor:
        """Prefill (any lengths): y_TNH with D's skip; each sequence's last state written back to its slot."""
        ...

    def mamba2_decode(self, x_TNH: torch.Tensor, dt_TN: torch.Tensor, B_TGK: torch.Tensor, C_TGK: torch.Tensor,
                      A_log_N: torch.Tensor, D_N: torch.Tensor, dt_bias_N: torch.Tensor,
                      state_pool_PNHK: torch.Tensor, query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
                      dt_min: float = 0.0, dt_max: float = math.inf, update_state: bool = True) -> torch.Tensor:
        """Decode and verify from each slot's state; update_state=False leaves the pool untouched (verify)."""
        ...

    def mamba2_replay(self, x_TNH: torch.Tensor, dt_TN: torch.Tensor, B_TGK: torch.Tensor, C_TGK: torch.Tensor,
                      A_log_N: torch.Tensor, D_N: torch.Tensor, dt_bias_N: torch.Tensor,
                      state_pool_PNHK: torch.Tensor, query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
                      num_accepted_S: torch.Tensor, dt_min: float = 0.0, dt_max: float = math.inf) -> None:
        """After a verify step that left the pool untouched: each slot advances over its accepted tokens."""
        ...


_REFERENCES = dict(mamba2_scan=reference_mamba2_scan, mamba2_decode=reference_mamba2_decode,
                   mamba2_replay=reference_mamba2_replay)


def _triton() -> dict[str, Any]:
    from .triton_mamba2 import triton_mamba2_decode, triton_mamba2_replay, triton_mamba2_scan

    return dict(mamba2_scan=triton_mamba2_scan, mamba2_decode=triton_mamba2_decode, mamba2_replay=triton_mamba2_replay)


registry.register("mamba2", Mamba2Kernels, triton=_triton, reference=_REFERENCES)
