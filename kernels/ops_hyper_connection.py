"""The hyper-connections family of the kernel seam (kernels/ops.py): the residual step after a block over n
residual streams (DeepSeek-V4's hyper-connections run it).

Reference in kernels/hyper_connection.py; Triton in kernels/triton_hyper_connection.py (imported only when a Triton
backend is built). Legend: T tokens, n streams, D hidden size.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .hyper_connection import reference_hc_expand


class HyperConnectionKernels(Protocol):
    def hc_expand(self, x_TnD: torch.Tensor, out_TD: torch.Tensor, post_Tn: torch.Tensor,
                  comb_Tnn: torch.Tensor) -> torch.Tensor:
        """The hyper-connections' residual step: stream k = post[k] * out + sum_j comb[j, k] * x[j], [T, n, D]."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_hyper_connection import triton_hc_expand

    return dict(hc_expand=triton_hc_expand)  # the mix and the residual add: one pass over the streams


registry.register("hyper_connection", HyperConnectionKernels, triton=_triton,
                  reference=dict(hc_expand=reference_hc_expand))
