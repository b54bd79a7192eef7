"""The gated delta rule's prefill through fla's chunked Triton kernels (fla-core's
`fla.ops.gated_delta_rule.chunk_gated_delta_rule`, what vLLM and SGLang run for Qwen3-Next prefill), where fla-core is
installed (the `gpu` extra) and the tensors are on CUDA; kernels/triton_gated_delta.py's recurrence otherwise.

Legend: T tokens, S sequences, P state-pool slots, G q/k heads, N value heads, K q/k head dim, V value head dim.

fla takes the starting states as a dense [S, N, K, V] tensor and returns the final ones the same way, so the
states are gathered from the pool by slot before (zeros for new sequences and padding rows) and scattered back
after by the commit kernel (slot -1 skipped on the device: no host sync). fla's kernels do not run in the Triton
interpreter (its loops index with plain ints there, and its autotuner benchmarks every config through a GPU
driver), so the CPU suite checks this module's gather and scatter with transformers' torch chunked rule standing in
for fla's (tests/kernels/test_gated_delta_fla.py), and a GPU run checks fla itself against the reference.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from .gated_delta import check_gdn_args


def fla_available() -> bool:
    """fla-core is importable (it is not part of the CPU set: requirements/lock-cpu.txt)."""
    return importlib.util.find_spec("fla") is not None


class FlaGatedDeltaRule:
    """`reference_gated_delta_rule`'s contract over a chunked kernel with fla's signature (`chunk_fn`, by default
    fla's chunk_gated_delta_rule, imported when first called on CUDA tensors). CPU tensors go to `fallback_fn`
    (the recurrence: fla does not run in the interpreter)."""

    def __init__(self, fallback_fn: Callable, chunk_fn: Callable | None = None, commit_fn: Callable | None = None):
        self.fallback_fn = fallback_fn
        self.chunk_fn = chunk_fn
        self.commit_fn = commit_fn

    def __call__(
        self, q_TGK: torch.Tensor, k_TGK: torch.Tensor, v_TNV: torch.Tensor, g_TN: torch.Tensor, beta_TN: torch.Tensor,
        state_pool_PNKV: torch.Tensor, query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
        has_initial_state_S: torch.Tensor | None = None, scale: float | None = None,
    ) -> torch.Tensor:
        # fla's chunked gated delta rule takes a decay per head: a per-channel one (KDA) runs the Triton recurrence.
        if (q_TGK.device.type != "cuda" and self.chunk_fn is None) or g_TN.dim() == 3:
            return self.fallback_fn(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1, slot_ids_S,
                                    has_initial_state_S, scale)
        if self.chunk_fn is None:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            self.chunk_fn = chunk_gated_delta_rule
        if self.commit_fn is None:
            from .triton_gated_delta import triton_commit_states

            self.commit_fn = triton_commit_states
        T, S, G, N, K, V = check_gdn_args(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1,
                                          slot_ids_S, has_initial_state_S)
        if state_pool_PNKV.dtype != torch.float32 or not state_pool_PNKV.is_contiguous():
            raise ValueError(f"state_pool_PNKV {state_pool_PNKV.dtype} is invalid: fla's path takes a contiguous "
                             "float32 pool.")
        if S == 0 or T == 0:
            return torch.empty(T, N, V, dtype=q_TGK.dtype, device=q_TGK.device)
        read_S = slot_ids_S >= 0
        if has_initial_state_S is not None:
            read_S = read_S & has_initial_state_S.to(torch.bool)
        init_SNKV = state_pool_PNKV[slot_ids_S.clamp_min(0).long()] * read_S[:, None, None, None]
        o, final_SNKV = self.chunk_fn(
            q_TGK[None], k_TGK[None], v_TNV[None], g_TN[None], beta_TN[None], scale=scale, initial_state=init_SNKV,
            output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=query_start_loc_S1.long())
        ones_S = torch.ones_like(slot_ids_S)
        self.commit_fn(state_pool_PNKV, slot_ids_S, final_SNKV.float().contiguous()[:, None], ones_S)
        return o[0].to(q_TGK.dtype)
