"""Rollout routing replay's capture (R3; `--enable-return-routed-experts`, SamplingParams.return_routed_experts): the
experts each token was routed to, per MoE layer, for an RL trainer to replay in its own forward.

Legend: L MoE layers, T the step's tokens, K top-k.

Every MoE layer (moe/layer.py) writes its router's top-k ids [T, K] (logical expert ids, before any placement maps
them to redundant copies; zero-computation experts as the router numbered them) into this step's rows of one device
buffer [L, T_max, K] int32. The copy is a device op: a decode graph captured with the capture on replays it, so
replayed steps record too. Two micro-batches (engine/rank/step_plan.py) call each layer twice per step, the first
micro-batch's tokens first: each layer appends at its own offset, so the rows stay in the flat batch's order. The
runner starts each step (`begin_step`) and reads the rows of the requests that asked (`rows`).
"""
from __future__ import annotations

import torch


class RoutingCapture:
    """One step's routed expert ids of every MoE layer of a rank's model."""

    def __init__(self, num_layers: int, top_k: int, device: torch.device):
        self.num_layers, self.top_k, self.device = num_layers, top_k, device
        # Grown by a step with more tokens than any before: warm-up runs the largest step first, so a decode graph
        # never captures a growth (it would bake a buffer the next growth replaces).
        self.buf_LTK = torch.full((num_layers, 0, top_k), -1, dtype=torch.int32, device=device)
        self._offsets = [0] * num_layers

    def begin_step(self) -> None:
        """A new step's rows start at 0 in every layer."""
        self._offsets = [0] * self.num_layers

    def record(self, layer: int, ids_TK: torch.Tensor) -> None:
        """Layer `layer`'s top-k ids of its next T rows (a padding row's -1 kept)."""
        T = ids_TK.shape[0]
        start = self._offsets[layer]
        self._offsets[layer] = start + T
        if start + T > self.buf_LTK.shape[1]:
            grown = torch.full((self.num_layers, start + T, self.top_k), -1, dtype=torch.int32, device=self.device)
            grown[:, : self.buf_LTK.shape[1]] = self.buf_LTK
            self.buf_LTK = grown
        self.buf_LTK[layer, start: start + T].copy_(ids_TK)

    def rows(self, rows_P: torch.Tensor) -> torch.Tensor:
        """The step's rows `rows_P` [P] of every layer: int32 [P, L, K] on the device."""
        return self.buf_LTK.index_select(1, rows_P).transpose(0, 1)
