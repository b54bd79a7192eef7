"""The gated-DeltaNet family of the kernel seam (kernels/ops.py): Qwen3-Next's and Qwen3.5-MoE's linear attention.

The short causal convolution (prefill, decode / verify, and a verify step's replay), the gates, the gated delta rule
(prefill, decode / verify) and the speculative commit and replay of the states. States are float32 in slot-indexed
pools, activations bf16 / fp16 / fp32. References in kernels/causal_conv1d.py, kernels/gated_delta.py; Triton in
kernels/triton_causal_conv1d.py, triton_gated_delta.py, and fla's chunked prefill where fla-core is installed
(kernels/fla_gated_delta.py), imported only when a Triton backend is built. Legend: T tokens, C conv channels, W conv
width, R = W - 1 kept inputs, P state slots, S sequences, Q tokens a sequence, G k heads, N v heads, K / V head sizes.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .causal_conv1d import reference_causal_conv1d, reference_causal_conv1d_update, reference_replay_conv_state
from .gated_delta import (reference_commit_states, reference_gated_delta_rule, reference_gated_delta_rule_decode,
                          reference_gdn_gating, reference_replay_gated_delta_state)


class GatedDeltaKernels(Protocol):
    def causal_conv1d(self, x_TC: torch.Tensor, weight_CW: torch.Tensor, bias_C: torch.Tensor | None,
                      conv_state_pool_PRC: torch.Tensor, query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
                      has_initial_state_S: torch.Tensor | None = None,
                      activation: str | None = "silu") -> torch.Tensor:
        """Prefill (any lengths): y_TC; each sequence's last R inputs written back to its slot."""
        ...

    def causal_conv1d_update(self, x_TC: torch.Tensor, weight_CW: torch.Tensor, bias_C: torch.Tensor | None,
                             conv_state_pool_PRC: torch.Tensor, query_start_loc_S1: torch.Tensor,
                             slot_ids_S: torch.Tensor, activation: str | None = "silu",
                             intermediate_states_SQRC: torch.Tensor | None = None) -> torch.Tensor:
        """Decode and verify from each slot's state; with intermediate_states_SQRC the pool is not touched."""
        ...

    def gdn_gating(self, a_TN: torch.Tensor, b_TN: torch.Tensor, A_log_N: torch.Tensor,
                   dt_bias_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_TN, beta_TN): g = -exp(A_log) * softplus(a + dt_bias) in float32, beta = sigmoid(b)."""
        ...

    def gated_delta_rule(self, q_TGK: torch.Tensor, k_TGK: torch.Tensor, v_TNV: torch.Tensor, g_TN: torch.Tensor,
                         beta_TN: torch.Tensor, state_pool_PNKV: torch.Tensor, query_start_loc_S1: torch.Tensor,
                         slot_ids_S: torch.Tensor, has_initial_state_S: torch.Tensor | None = None,
                         scale: float | None = None) -> torch.Tensor:
        """The gated delta rule over a packed batch of any lengths: o_TNV of q's dtype."""
        ...

    def gated_delta_rule_decode(self, q_TGK: torch.Tensor, k_TGK: torch.Tensor, v_TNV: torch.Tensor,
                                g_TN: torch.Tensor, beta_TN: torch.Tensor, state_pool_PNKV: torch.Tensor,
                                query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
                                intermediate_states_SQNKV: torch.Tensor | None = None,
                                scale: float | None = None) -> torch.Tensor:
        """Decode and verify, each sequence from its slot's state (intermediate states kept when given): o_TNV."""
        ...

    def commit_states(self, pool_PX: torch.Tensor, slot_ids_S: torch.Tensor, intermediate_states_SQX: torch.Tensor,
                      num_accepted_S: torch.Tensor) -> None:
        """After a verify step: each slot takes its sequence's state after its accepted tokens."""
        ...

    def replay_gated_delta_state(self, k_TGK: torch.Tensor, v_TNV: torch.Tensor, g_TN: torch.Tensor,
                                 beta_TN: torch.Tensor, state_pool_PNKV: torch.Tensor,
                                 query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
                                 num_accepted_S: torch.Tensor) -> None:
        """After a verify step that left the pool untouched: each slot advances over its accepted tokens."""
        ...

    def replay_conv_state(self, x_TC: torch.Tensor, conv_state_pool_PRC: torch.Tensor,
                          query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
                          num_accepted_S: torch.Tensor) -> None:
        """After a verify step that left the pool untouched: each conv slot takes its accepted tokens' inputs."""
        ...


def _triton() -> dict[str, Any]:
    from .fla_gated_delta import FlaGatedDeltaRule, fla_available
    from .triton_causal_conv1d import triton_causal_conv1d, triton_causal_conv1d_update, triton_replay_conv_state
    from .triton_gated_delta import (triton_commit_states, triton_gated_delta_rule, triton_gated_delta_rule_decode,
                                     triton_gdn_gating, triton_replay_gated_delta_state)

    return dict(causal_conv1d=triton_causal_conv1d, causal_conv1d_update=triton_causal_conv1d_update,
                gdn_gating=triton_gdn_gating,
                # Prefill: fla's chunked kernels where fla-core is installed (the `gpu` extra; CUDA only), else the
                # recurrence.
                gated_delta_rule=(FlaGatedDeltaRule(fallback_fn=triton_gated_delta_rule) if fla_available()
                                  else triton_gated_delta_rule),
                gated_delta_rule_decode=triton_gated_delta_rule_decode,  # decode, verify (intermediate states)
                commit_states=triton_commit_states,  # verify's kept states -> slots
                replay_gated_delta_state=triton_replay_gated_delta_state,  # or: no buffers, accepted tokens re-run
                replay_conv_state=triton_replay_conv_state)


registry.register("gated_delta", GatedDeltaKernels, triton=_triton,
                  reference=dict(causal_conv1d=reference_causal_conv1d,
                                 causal_conv1d_update=reference_causal_conv1d_update, gdn_gating=reference_gdn_gating,
                                 gated_delta_rule=reference_gated_delta_rule,  # chunked per long sequence, else batched
                                 gated_delta_rule_decode=reference_gated_delta_rule_decode,
                                 commit_states=reference_commit_states,
                                 replay_gated_delta_state=reference_replay_gated_delta_state,
                                 replay_conv_state=reference_replay_conv_state))
