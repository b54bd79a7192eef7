"""Building blocks shared by the decoder's layer kinds: the per-step context, norm, dense MLP.

Legend: T tokens in the flat batch, D hidden, I intermediate size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from moelink.kernels.attention import AttentionMetadata
from moelink.kernels.silu_mul import reference_silu_mul
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ..contract.forward_inputs import ImageSplice
from ..tp.group import TensorParallel
from ..tp.linear import ColumnParallel, RowParallel
from .linear import Linear, linear_method
from .mlp_fusion import FusedMLP
from ..state.step import StateStep

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


@dataclass
class ForwardContext:
    """Per-step inputs every layer needs besides its activations."""

    attn: AttentionMetadata
    # Per layer, the cache tensors of its attention kind (its `<module>_config.py`: cache_shapes): (k_cache_BLKH,
    # v_cache_BLKH) for GQA, (latent_cache_BLR,) for MLA.
    kv_caches: list[tuple[torch.Tensor, ...]]
    # The sliding-window layers' metadata when their group has its own block table (its block tables and KV
    # slots; the rest as `attn`); None: every layer reads `attn`.
    attn_sliding: AttentionMetadata | None = None
    # Residual-stream states the main model's forward keeps for a drafter (EAGLE-3), or None: keep nothing.
    aux: "AuxCapture | None" = None
    # Layers with per-sequence state (linear attention): the step's slots (engine/state/step.py); their
    # `kv_caches` entries are their state pools. None: the model has no such layers.
    state: StateStep | None = None
    # DeepSeek Sparse Attention: the positions the last indexer of this forward selected, int32 [T, index_topk] (-1
    # padded), or None for a dense step; set by each layer with an indexer, read by GLM-5's shared layers after it.
    dsa_topk: torch.Tensor | None = None
    # A step with image tokens (a multimodal model, engine/multimodal/): their embeddings and the step's 3-D rotary
    # positions. None: a text step, untouched.
    images: ImageSplice | None = None

    def select(self, s0: int, s1: int) -> "ForwardContext":
        """The context of sequences [s0, s1) only (a micro-batch): same caches, their metadata, a capture of its
        own (engine/rank/step_plan.py joins the micro-batches' captures back)."""
        sliding = self.attn_sliding.select(s0, s1) if self.attn_sliding is not None else None
        aux = AuxCapture(self.aux.layers) if self.aux is not None else None
        state = self.state.select(s0, s1) if self.state is not None else None
        images = None
        if self.images is not None:
            lens = self.attn.query_lens
            images = self.images.select(sum(lens[:s0]), sum(lens[:s1]))
        return ForwardContext(self.attn.select(s0, s1), self.kv_caches, sliding, aux, state, images=images)


class AuxCapture:
    """What a main-model forward keeps for an EAGLE-3 drafter: the residual stream (hidden + residual, the input
    of the next layer before its input_layernorm) after each of `layers` main layers, [T, D] each; 0 is the
    embedding, L the last layer's output before the final norm. Filled by the forward on the device (no sync;
    MoEDecoderForCausalLM.stages), read by the drafter in the same step. `layers` may repeat a count (a tiny
    target's default low and mid can coincide): `states` gives one tensor per entry, in order."""

    def __init__(self, layers: tuple[int, ...]):
        self.layers = tuple(layers)
        self.wanted = frozenset(layers)
        self.by_layer: dict[int, torch.Tensor] = {}

    def take(self, n: int, x_TD: torch.Tensor, residual_TD: torch.Tensor | None) -> None:
        """The stream after `n` layers, from the layer loop's (x, residual) pair (residual None: x alone)."""
        if n in self.wanted:
            self.by_layer[n] = x_TD if residual_TD is None else x_TD + residual_TD

    def states(self) -> list[torch.Tensor]:
        """[T, D] per entry of `layers`, in order."""
        missing = [n for n in self.layers if n not in self.by_layer]
        if missing:
            raise RuntimeError(f"the forward captured no state after layer(s) {missing}: run the model with this "
                               "capture in its ForwardContext.")
        return [self.by_layer[n] for n in self.layers]

    def join(self, parts: list["AuxCapture"]) -> None:
        """Keep the micro-batches' captures, concatenated in the flat batch's order (parts in that order)."""
        for n in self.wanted:
            self.by_layer[n] = torch.cat([p.by_layer[n] for p in parts])


def param(*shape, dtype, device) -> nn.Parameter:
    """An uninitialised, frozen parameter (the loader fills it from the checkpoint)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, kernels: Kernels, dtype, device=None):
        super().__init__()
        self.weight = param(size, dtype=dtype, device=device)
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x_TD: torch.Tensor, residual_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.add_rms_norm(x_TD, residual_TD, self.weight, self.eps)

    def add_forward_fp8(self, x_TD: torch.Tensor, residual_TD: torch.Tensor, group: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """add_forward and its output quantized for FP8 experts (xq e4m3, xs per token and `group` channels)."""
        return self.kernels.add_rms_norm_fp8(x_TD, residual_TD, self.weight, self.eps, group)

    def weight_plan(self, name: str) -> WeightPlan:
        return {name: PlanEntry(self.weight, ())}


class DenseMLP(nn.Module):
    """SiLU-gated MLP with gate and up stacked (gate_up_proj's two pieces): the dense layers, and the shared
    experts of DeepSeek / GLM MoE layers (one MLP of n_shared_experts * moe_intermediate_size)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype, device=None, *, kernels: Kernels | None = None,
                 quant=None, prefix: str = "", tp: TensorParallel | None = None, reduce: bool = True,
                 activation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        """quant: engine/config/quantization.py's config (None = float); prefix: the checkpoint names' prefix
        ("model.layers.{i}.mlp."), which modules_to_not_convert is matched against. tp: the rank's TensorParallel
        (None: whole): gate_up column-parallel over the intermediate size, down row-parallel (an all-reduce; with
        reduce False the partial sum is returned for the caller to all-reduce with the routed experts').
        activation: act(gate, up) in place of SiLU(gate)·up (MiniMax-M3's clamped SwiGLU: kernels.moe.MoEActivation)."""
        super().__init__()
        col = row = None
        if tp is not None and tp.size > 1:
            intermediate_size //= tp.size
            i0 = tp.rank * intermediate_size
            col = ColumnParallel((i0, i0), (intermediate_size, intermediate_size))
            row = RowParallel(tp, i0, intermediate_size, reduce)
        self.intermediate_size = intermediate_size
        gate_up = linear_method(quant, prefix + "gate_proj", prefix + "up_proj")
        self.gate_up_proj = Linear(hidden_size, (intermediate_size, intermediate_size), gate_up, kernels, dtype, device,
                                   parallel=col)
        self.down_proj = Linear(intermediate_size, hidden_size, linear_method(quant, prefix + "down_proj"), kernels,
                                dtype, device, parallel=row)
        # SiLU(gate)·up: one launch with the Triton kernels (kernels/silu_mul.py); torch's two ops without kernels.
        self.silu_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
            activation or getattr(kernels, "silu_mul", reference_silu_mul))
        # A decode batch's two GEMV launches with their epilogues (engine/models/mlp_fusion.py), where they apply.
        self.fusion = FusedMLP.for_mlp(kernels, self.gate_up_proj, self.down_proj, intermediate_size,
                                       silu=activation is None)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.fusion is not None and self.fusion.takes(x_TD):
            return self.fusion.forward(x_TD)
        gate_TI, up_TI = self.gate_up_proj.split(self.gate_up_proj(x_TD))
        return self.down_proj(self.silu_mul(gate_TI, up_TI))

    def forward_add(self, x_TD: torch.Tensor, addend_TD: torch.Tensor) -> torch.Tensor:
        """forward(x) + addend (the shared experts' output and the routed experts' sum), the add inside the down
        projection's launch where the fusion takes the step."""
        if (self.fusion is not None and self.fusion.takes(x_TD) and addend_TD.dtype == x_TD.dtype
                and addend_TD.shape == x_TD.shape):  # (else torch's add: its promotion and broadcasting)
            return self.fusion.forward(x_TD, addend_TD)
        return self.forward(x_TD) + addend_TD

    def weight_plan(self, p: str) -> WeightPlan:
        """Checkpoint names under `p` ("model.layers.{i}.mlp." or "...mlp.shared_experts.") → (parameter, index)."""
        return {**self.gate_up_proj.weight_plan(p + "gate_proj.weight", 0),
                **self.gate_up_proj.weight_plan(p + "up_proj.weight", 1),
                **self.down_proj.weight_plan(p + "down_proj.weight")}
