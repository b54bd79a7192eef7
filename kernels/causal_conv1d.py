"""The short causal convolution before gated DeltaNet (Qwen3-Next, Qwen3.5-MoE: depthwise, kernel 4, SiLU, over the
concatenated q/k/v projections) over packed variable-length batches with per-sequence conv states in a state pool:
plain-torch references (the contract, the float64 oracle and the CPU path); kernels/triton_causal_conv1d.py is the
GPU path.

Legend: T tokens (packed, sequence after sequence), S sequences, P state-pool slots, C channels (2 G K + N V for
gated DeltaNet), W kernel width, R = W - 1 state rows, Q intermediate states kept per sequence.

Math (transformers' causal_conv1d_fn / causal_conv1d_update): y_t[c] = act(bias[c] + sum_w weight[c, w] x_{t-R+w}[c])
with x_u for u before the sequence's first token taken from its conv state (zeros for a new sequence), computed in
float32 (float64 when x is) and rounded once to x's dtype. act is SiLU ("silu") or none (None).

The conv state pool, conv_state_pool_PRC: [P, R, C] of the activations' dtype, the sequence's last R inputs (rows
oldest first, channels contiguous like x_TC; transformers keeps W columns, [C, W], whose oldest no output reads).
Slots, padding rows (slot -1), has_initial_state_S and the speculative-decoding buffers (intermediate_states_SQRC,
committed by gated_delta.reference_commit_states) follow kernels/gated_delta.py's protocol.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gated_delta import check_batch_args

ACTIVATIONS = ("silu", None)


def check_conv_args(x_TC, weight_CW, bias_C, conv_state_pool_PRC, query_start_loc_S1, slot_ids_S,
                    has_initial_state_S=None, activation="silu", intermediate_states_SQRC=None) -> tuple[int, int, int, int]:
    """Shape checks shared by every backend; returns (T, S, C, W)."""
    if x_TC.dim() != 2:
        raise ValueError(f"x_TC {tuple(x_TC.shape)} must be [T, C].")
    T, C = x_TC.shape
    if weight_CW.dim() != 2 or weight_CW.shape[0] != C or weight_CW.shape[1] < 2:
        raise ValueError(f"weight_CW {tuple(weight_CW.shape)} must be [C={C}, W] with W >= 2 (conv1d.weight squeezed).")
    W = weight_CW.shape[1]
    if bias_C is not None and tuple(bias_C.shape) != (C,):
        raise ValueError(f"bias_C {tuple(bias_C.shape)} must be [C={C}] or None.")
    if conv_state_pool_PRC.dim() != 3 or tuple(conv_state_pool_PRC.shape[1:]) != (W - 1, C):
        raise ValueError(f"conv_state_pool_PRC {tuple(conv_state_pool_PRC.shape)} must be [P, R={W - 1}, C={C}].")
    S = check_batch_args(query_start_loc_S1, slot_ids_S, has_initial_state_S)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is invalid: choose 'silu' or None.")
    if intermediate_states_SQRC is not None:
        x = intermediate_states_SQRC
        if x.dim() != 4 or x.shape[0] != S or tuple(x.shape[2:]) != (W - 1, C) or x.dtype != conv_state_pool_PRC.dtype:
            raise ValueError(f"intermediate_states_SQRC {tuple(x.shape)} {x.dtype} must be [S={S}, Q, {W - 1}, {C}] "
                             f"{conv_state_pool_PRC.dtype} (the pool's dtype).")
    return T, S, C, W


def check_replay_args(x_TC, conv_state_pool_PRC, query_start_loc_S1, slot_ids_S, num_accepted_S) -> int:
    """Shape checks of the replay shared by every backend; returns S."""
    S = query_start_loc_S1.numel() - 1
    if tuple(slot_ids_S.shape) != (S,) or tuple(num_accepted_S.shape) != (S,):
        raise ValueError(f"slot_ids_S {tuple(slot_ids_S.shape)} and num_accepted_S {tuple(num_accepted_S.shape)} must "
                         f"be [S={S}] (query_start_loc_S1 has S + 1 entries).")
    if x_TC.dim() != 2 or conv_state_pool_PRC.dim() != 3 or conv_state_pool_PRC.shape[2] != x_TC.shape[1]:
        raise ValueError(f"conv_state_pool_PRC {tuple(conv_state_pool_PRC.shape)} must be [P, R, C={x_TC.shape[-1]}].")
    return S


def _conv(x_LC, init_RC, weight_CW, bias_C, activation, cdt):
    """One sequence: (y_LC in cdt, the inputs with their R rows of history [R + L, C] in cdt)."""
    xx = torch.cat([init_RC.to(cdt), x_LC.to(cdt)])
    if x_LC.shape[0] == 0:
        return xx[:0], xx
    # The W taps summed oldest first onto the bias, as the kernels do (F.conv1d's depthwise CPU path is ~20x slower).
    L, w_CW = x_LC.shape[0], weight_CW.to(cdt)
    y = torch.zeros(L, xx.shape[1], dtype=cdt, device=xx.device)
    if bias_C is not None:
        y += bias_C.to(cdt)
    for w in range(w_CW.shape[1]):
        y.addcmul_(xx[w: w + L], w_CW[:, w])
    return (F.silu(y, inplace=True) if activation == "silu" else y), xx


def _apply(x_TC, weight_CW, bias_C, pool, query_start_loc_S1, slot_ids_S, has_initial_state_S, activation, inter):
    cdt = torch.float64 if x_TC.dtype == torch.float64 else torch.float32
    R = weight_CW.shape[1] - 1
    qsl = query_start_loc_S1.tolist()  # device -> host sync (the reference's CPU path: already on the host)
    slots = slot_ids_S.tolist()
    reads = [slot >= 0 for slot in slots]
    if has_initial_state_S is not None:
        reads = [r and bool(h) for r, h in zip(reads, has_initial_state_S.tolist())]
    # Every state is read before any is written (the kernels' order).
    inits = [pool[slot].clone() if r else pool.new_zeros(pool.shape[1:]) for slot, r in zip(slots, reads)]
    y_TC = torch.empty(x_TC.shape, dtype=x_TC.dtype, device=x_TC.device)
    for s, slot in enumerate(slots):
        a, b = qsl[s], qsl[s + 1]
        y, xx = _conv(x_TC[a:b], inits[s], weight_CW, bias_C, activation, cdt)
        y_TC[a:b] = y.to(x_TC.dtype)
        if inter is not None:
            for j in range(min(b - a, inter.shape[1])):
                inter[s, j] = xx[j + 1: j + 1 + R].to(inter.dtype)
        elif slot >= 0:
            pool[slot] = xx[xx.shape[0] - R:].to(pool.dtype)
    return y_TC


def reference_causal_conv1d(
    x_TC: torch.Tensor, weight_CW: torch.Tensor, bias_C: torch.Tensor | None, conv_state_pool_PRC: torch.Tensor,
    query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor, has_initial_state_S: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Prefill (any lengths): y_TC (x's dtype). Each sequence's history is its slot's conv state (zeros where
    has_initial_state_S is False or the slot is -1); its last R inputs (history included, for sequences shorter
    than R) are written back to the slot."""
    check_conv_args(x_TC, weight_CW, bias_C, conv_state_pool_PRC, query_start_loc_S1, slot_ids_S,
                    has_initial_state_S, activation)
    return _apply(x_TC, weight_CW, bias_C, conv_state_pool_PRC, query_start_loc_S1, slot_ids_S, has_initial_state_S,
                  activation, None)


def reference_causal_conv1d_update(
    x_TC: torch.Tensor, weight_CW: torch.Tensor, bias_C: torch.Tensor | None, conv_state_pool_PRC: torch.Tensor,
    query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor, activation: str | None = "silu",
    intermediate_states_SQRC: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode and speculative verify (a few tokens per sequence, query_start_loc_S1 = arange for plain decode):
    every sequence continues from its slot's state (slot -1: a padding row, zeros in, nothing written). Without
    intermediate_states_SQRC the final states are written back; with it, the state after token j of sequence s
    (its last R inputs) goes to intermediate_states_SQRC[s, j] for j < Q and the pool is not touched."""
    check_conv_args(x_TC, weight_CW, bias_C, conv_state_pool_PRC, query_start_loc_S1, slot_ids_S, None, activation,
                    intermediate_states_SQRC)
    return _apply(x_TC, weight_CW, bias_C, conv_state_pool_PRC, query_start_loc_S1, slot_ids_S, None, activation,
                  intermediate_states_SQRC)


def reference_replay_conv_state(x_TC: torch.Tensor, conv_state_pool_PRC: torch.Tensor, query_start_loc_S1: torch.Tensor,
                                slot_ids_S: torch.Tensor, num_accepted_S: torch.Tensor) -> None:
    """After a verify step that left the pool untouched (intermediate_states_SQRC of Q = 0): each slot (>= 0) takes the
    last R inputs of its old state followed by the first num_accepted_S[s] tokens of its sequence in x_TC (the verify
    step's conv input; 0 keeps the state). kernels/gated_delta.py describes the protocol."""
    S = check_replay_args(x_TC, conv_state_pool_PRC, query_start_loc_S1, slot_ids_S, num_accepted_S)
    R = conv_state_pool_PRC.shape[1]
    qsl = query_start_loc_S1.tolist()  # device -> host sync (reference only)
    for s, (slot, n) in enumerate(zip(slot_ids_S.tolist(), num_accepted_S.tolist())):
        n = max(0, min(qsl[s + 1] - qsl[s], n))
        if slot >= 0:
            xx = torch.cat([conv_state_pool_PRC[slot], x_TC[qsl[s]: qsl[s] + n].to(conv_state_pool_PRC.dtype)])
            conv_state_pool_PRC[slot] = xx[xx.shape[0] - R:]
