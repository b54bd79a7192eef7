"""Hyper-connections in plain torch: the residual step after a block, over `hc_mult` residual streams
(DeepSeek-V4's manifold-constrained hyper-connections, engine/models/hyper_connections.py). The reference
kernels/triton_hyper_connection.py replaces behind kernels/ops.py, and the oracle of its tests.

Legend: T tokens, n streams, D hidden size.
"""
from __future__ import annotations

import torch


def reference_hc_expand(x_TnD: torch.Tensor, out_TD: torch.Tensor, post_Tn: torch.Tensor,
                        comb_Tnn: torch.Tensor) -> torch.Tensor:
    """The hyper-connections' residual step after a block (engine/models/hyper_connections.py): stream k
    becomes post[k] * out + sum_j comb[j, k] * x[j], in the activations' dtype (the float32 mixes cast to it, as
    transformers' DeepseekV4HyperConnection does): [T, n, D]."""
    dt = x_TnD.dtype
    return post_Tn.to(dt).unsqueeze(-1) * out_TD.unsqueeze(-2) + torch.matmul(comb_Tnn.to(dt).transpose(-1, -2), x_TnD)


__all__ = ["reference_hc_expand"]
