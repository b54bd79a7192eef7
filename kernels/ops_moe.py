"""The fused-MoE family of the kernel seam (kernels/ops.py): the routed experts' grouped GEMMs, one op per weight
format (float, FP8 block-scaled W8A8, MXFP4, NVFP4 and INT4 W4A16).

References in kernels/moe.py, fp8.py, mxfp4.py, nvfp4.py, int4.py (the contract); Triton in kernels/triton_moe.py,
triton_moe_fp8.py, triton_moe_mxfp4.py, triton_moe_nvfp4.py, triton_moe_int4.py (imported only when a Triton backend
is built). Legend: T tokens, D hidden size, I intermediate size, F = 2I, E local experts, G global experts, K top-k;
a format's packed dims: S scale groups, Q bytes a group, B packed bytes, W int32 words.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .fp8 import reference_fused_moe_fp8
from .int4 import reference_fused_moe_int4
from .moe import SILU, MoEActivation, reference_fused_moe
from .mxfp4 import reference_fused_moe_mxfp4
from .nvfp4 import reference_fused_moe_nvfp4


class MoEKernels(Protocol):
    def fused_moe(self, x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDI: torch.Tensor,
                  topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor, expert_map_G: torch.Tensor | None = None,
                  *, b13_EF: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
                  activation: MoEActivation = SILU) -> torch.Tensor:
        """out[t] = Σ_k w[t,k] · (down_e(act(gate_e(x[t]), up_e(x[t]))) + b2_e), e = ids[t,k] local."""
        ...

    def fused_moe_fp8(self, x_TD: torch.Tensor, w13q_EFD: torch.Tensor, w13_scale_inv: torch.Tensor,
                      w2q_EDI: torch.Tensor, w2_scale_inv: torch.Tensor, topk_weights_TK: torch.Tensor,
                      topk_ids_TK: torch.Tensor, expert_map_G: torch.Tensor | None = None,
                      block: tuple[int, int] = (128, 128), *,
                      activation: MoEActivation | None = None,
                      x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """fused_moe with FP8 block-scaled expert weights and W8A8 activations: [T, D] in x's dtype; `activation`
        in place of SiLU (None: SiLU); `x_fp8`: x already quantized per token and Bk channels (xq, xs), by the
        norm before (add_rms_norm_fp8)."""
        ...

    def fused_moe_mxfp4(self, x_TD: torch.Tensor, w13_blocks_EFSQ: torch.Tensor, w13_scales_EFS: torch.Tensor,
                        w2_blocks_EDSQ: torch.Tensor, w2_scales_EDS: torch.Tensor, topk_weights_TK: torch.Tensor,
                        topk_ids_TK: torch.Tensor, expert_map_G: torch.Tensor | None = None, *,
                        b13_EF: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
                        activation: MoEActivation = SILU) -> torch.Tensor:
        """fused_moe with MXFP4 expert weights (W4A16): [T, D] in x's dtype."""
        ...

    def fused_moe_nvfp4(self, x_TD: torch.Tensor, w13_q_EFB: torch.Tensor, w13_scale_EFS: torch.Tensor,
                        w13_scale2_E2: torch.Tensor, w2_q_EDB: torch.Tensor, w2_scale_EDS: torch.Tensor,
                        w2_scale2_E: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                        expert_map_G: torch.Tensor | None = None, *, b13_EF: torch.Tensor | None = None,
                        b2_ED: torch.Tensor | None = None, activation: MoEActivation = SILU) -> torch.Tensor:
        """fused_moe with NVFP4 expert weights (W4A16): [T, D] in x's dtype."""
        ...

    def fused_moe_int4(self, x_TD: torch.Tensor, w13_q_EFW: torch.Tensor, w13_s_EFS: torch.Tensor,
                       w2_q_EDW: torch.Tensor, w2_s_EDS: torch.Tensor, topk_weights_TK: torch.Tensor,
                       topk_ids_TK: torch.Tensor, expert_map_G: torch.Tensor | None = None, *,
                       w13_z_EFS: torch.Tensor | None = None, w2_z_EDS: torch.Tensor | None = None,
                       b13_EF: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
                       activation: MoEActivation = SILU) -> torch.Tensor:
        """fused_moe with INT4 expert weights (W4A16; optional zero points): [T, D] in x's dtype."""
        ...


def _triton() -> dict[str, Any]:
    import functools

    from .triton_int4_dequant import DequantWorkspace
    from .triton_moe import triton_fused_moe
    from .triton_moe_fp8 import triton_fused_moe_fp8
    from .triton_moe_int4 import triton_fused_moe_int4
    from .triton_moe_mxfp4 import triton_fused_moe_mxfp4
    from .triton_moe_nvfp4 import triton_fused_moe_nvfp4

    # W4A16 INT4 (kernels/int4.py): decode GEMVs, dequantizing K loops, and for prefill-sized batches the experts
    # dequantized once into this backend's one workspace (every layer reuses it), then the bf16 GEMMs; the backend
    # keeps it as `int4_workspace`.
    int4_workspace = DequantWorkspace()
    return dict(fused_moe=triton_fused_moe,  # takes the reference's b13_EF / b2_ED / activation keywords too
                fused_moe_fp8=triton_fused_moe_fp8,
                fused_moe_mxfp4=triton_fused_moe_mxfp4,
                fused_moe_nvfp4=triton_fused_moe_nvfp4,  # W4A16: dequantizing K loops (kernels/nvfp4.py)
                fused_moe_int4=functools.partial(triton_fused_moe_int4, workspace=int4_workspace),
                int4_workspace=int4_workspace)


registry.register("moe", MoEKernels, triton=_triton,
                  reference=dict(fused_moe=reference_fused_moe, fused_moe_fp8=reference_fused_moe_fp8,
                                 fused_moe_mxfp4=reference_fused_moe_mxfp4, fused_moe_nvfp4=reference_fused_moe_nvfp4,
                                 fused_moe_int4=reference_fused_moe_int4))
