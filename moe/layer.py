"""The MoE layer: router → (dispatch) → local experts → (combine), over the experts this rank holds.

Legend: T local tokens, N tokens received by this rank, D hidden, E local
experts, G logical experts, I expert intermediate size, F = 2I, K top-k.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generator, Protocol

import torch
from torch import nn
import torch.nn.functional as F

from moelink.comm.a2a_base import AllToAll
from moelink.kernels.moe import SILU, MoEActivation
from moelink.kernels.mxfp4 import to_pair_order
from moelink.kernels.norm import FUSED_MAX_TOKENS

from .expert_weights import ExpertFormat, FloatExperts, Fp8BlockExperts, Mxfp4Experts
from .fp8_input import Fp8Input
from .placement import ExpertPlacement, PlacementTables
from . import routing_replay
from .router import Router
from .stats import MoEStats

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels

# A layer's work as a generator: it yields while an all-to-all is in flight and returns its output.
Stages = Generator[None, None, torch.Tensor]
# An empty micro-batch's stages under EP (`moe_only_stages`): the MoE layers' collectives alone, no output.
MoEOnlyStages = Generator[None, None, None]


def run_stages(stages: Generator):
    """Drive a stages generator to the end with nothing in between (no overlap); returns its result."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value


@dataclass
class ExpertParallel:
    """What a rank needs to run its share of the experts.

    `all_to_all` is any backend behind moelink.comm's AllToAll interface; the
    layer never asks which one. `tables` are the placement's device tables
    (`placement.to_tensors(device)`) that dispatch asks where each (token,
    expert) pair goes.
    """

    rank: int
    world_size: int
    placement: ExpertPlacement
    all_to_all: AllToAll
    tables: PlacementTables

    @property
    def local_experts(self) -> list[int]:
        return self.placement.experts_on_rank(self.rank)


def own_tables(ep: ExpertParallel | None) -> PlacementTables | None:
    """A layer's own copy of `ep`'s placement tables (G x X int32, small), as wide as any placement of these
    slots can need (a rank holds one copy of an expert at most): online EPLB rewrites them in place, and a
    survivor that keeps its layers through an elastic-EP recovery takes new ones (engine/rank/keep_runner.py)."""
    if ep is None or ep.tables is None:
        return None
    return ep.tables.padded(max(ep.tables.max_replicas, min(ep.world_size, 1 + ep.placement.num_redundant)))


class ExpertsHook(Protocol):
    """What runs a layer's experts in place of its expert format when set (`MoELayer.lora_experts`) and active for
    the step: LoRA adapters on the experts (engine/lora/experts.py). Set only with LoRA enabled."""

    def active(self) -> bool: ...

    def token_slots(self) -> torch.Tensor | None:
        """Each of the step's tokens' adapter slot (long [T], -1: none); None: no row has an adapter."""
        ...

    def carries(self) -> bool:
        """Under EP: whether this step's dispatch carries each token's slot (decided alike on every rank)."""
        ...

    def __call__(self, layer: "MoELayer", x_TD: torch.Tensor, weights_TK: torch.Tensor,
                 ids_TK: torch.Tensor, slots_T: torch.Tensor | None = None) -> torch.Tensor: ...


class MoELayer(nn.Module):
    """A sparse MLP block. Expert weights are stacked: w13_EFD = [gate; up], w2_EDI = down, held (with any
    scales beside them) by `expert_format` (moe/expert_weights.py: float, FP8 block-scaled, or MXFP4, whose
    packed blocks and scales replace w13 / w2).

    `kernels` is the device's kernel strategy (moelink.kernels.ops). Without
    `ep` every expert is local and tokens never leave the rank. A router that
    selects with a correction bias (`router.needs_bias`) gets the checkpoint's
    `e_score_correction_bias`, held here in float32 whatever the model dtype
    (transformers keeps it in float32 too: it decides ties between experts).

    gpt-oss: `router_bias` adds a bias to the router linear (gate_bias_G), `expert_bias` gives each local expert
    a [gate; up] bias (b13_EF, de-interleaved at load like w13) and a down bias (b2_ED), and `activation` is the
    experts' gated activation (kernels.moe.MoEActivation: SiLU, or gpt-oss's clamped SwiGLU). A layer with
    none of them calls the expert kernel exactly as before.
    """

    lora_experts: ExpertsHook | None = None  # LoRA on the experts (engine/lora/), set by the rank when enabled

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, router: Router,
                 kernels: Kernels, dtype: torch.dtype, device: torch.device | None = None, *,
                 ep: ExpertParallel | None = None, moe_index: int = 0, stats: MoEStats | None = None,
                 expert_format: ExpertFormat | None = None,
                 router_bias: bool = False, expert_bias: bool = False, activation: MoEActivation = SILU,
                 zero_experts: int = 0, weight_on_input: bool = False):
        super().__init__()
        self.num_experts = num_experts
        # Llama 4 (MoEConfig.router_weight_on_input): each token's routing weight multiplies its input to the expert,
        # not the expert's output (expert(w x), not w expert(x): the expert is not linear), and the expert's output
        # is summed with weight 1. Top-1 only: every pick of a token would need an input of its own.
        if weight_on_input and (router.top_k != 1 or zero_experts):
            raise ValueError(f"MoELayer weight_on_input needs top-1 routing without zero-computation experts; got "
                             f"top_k={router.top_k}, zero_experts={zero_experts}.")
        self.weight_on_input = weight_on_input
        # Zero-computation experts (LongCat-Flash): the router scores num_experts + zero_experts; a pick of one of
        # the last zero_experts is its weight times the token itself (an identity expert), no weights, no traffic.
        self.zero_experts = zero_experts
        # What this rank adds of the identity picks: 1, or 0 on all but one rank where the experts' channels are
        # split over a TP group and the partial sums are all-reduced (engine/models/blocks/ffn.py).
        self.identity_share = 1.0
        routed = num_experts + zero_experts
        self.router = router
        self.kernels = kernels
        self.ep = ep
        # This layer's placement tables: the plan's at first; online EPLB (moe/expert_move.py) swaps in a
        # per-layer table at a step boundary, together with the layer's expert weights.
        # A copy of its own (G x X int32, small), as wide as any placement of these slots can need (a rank
        # holds one copy of an expert at most): online EPLB rewrites one layer's tables in place.
        self.ep_tables = own_tables(ep)  # (None: built to count weights)
        self.placement = ep.placement if ep is not None else None
        self.moe_index = moe_index
        self.stats = stats
        num_local = len(ep.local_experts) if ep is not None else num_experts
        self.num_local_slots = num_local
        # The DeepSeek family runs its gate matmul in float32 (as transformers does): the weight is held in
        # float32 from load, not cast every step (7 MB read + written per layer per step at DeepSeek-V3 size).
        gate_dtype = torch.float32 if router.float32_logits else dtype
        self.gate_GD = nn.Parameter(torch.empty(routed, hidden_size, dtype=gate_dtype, device=device),
                                    requires_grad=False)
        # w13_EFD, w2_EDI (and the format's scales) are the format's parameters, set on this layer.
        self.expert_format = expert_format if expert_format is not None else FloatExperts()
        fmt = self.expert_format
        if (expert_bias and not fmt.supports_extras) or (activation != SILU and not (
                fmt.supports_extras or activation.kind in getattr(fmt, "activations", ()))):
            raise ValueError(f"expert weights in {fmt.name} with expert biases or the "
                             f"{activation.kind} activation are not supported: only float (and MXFP4) experts "
                             "take gpt-oss's biases and clamped SwiGLU (FP8 ones the silu_clamp activation).")
        self.expert_format.create(self, num_local, hidden_size, intermediate_size, dtype, device)
        factory = dict(dtype=dtype, device=device)
        self.e_score_correction_bias_G = (
            nn.Parameter(torch.zeros(routed, dtype=torch.float32, device=device), requires_grad=False)
            if router.needs_bias else None
        )
        self.gate_bias_G = (nn.Parameter(torch.empty(routed, dtype=gate_dtype, device=device), requires_grad=False)
                            if router_bias else None)
        # A decode batch's gate GEMV and route_topk in one launch on the Triton kernels (kernels.gate_route_topk):
        # its per-token counters, zeros the launch leaves zero (None: the two ops apart, always).
        self.gate_counters_T = (torch.zeros(FUSED_MAX_TOKENS, dtype=torch.int32, device=device)
                                if getattr(kernels, "name", None) == "triton" else None)
        self.b13_EF = (nn.Parameter(torch.empty(num_local, 2 * intermediate_size, **factory), requires_grad=False)
                       if expert_bias else None)
        self.b2_ED = (nn.Parameter(torch.empty(num_local, hidden_size, **factory), requires_grad=False)
                      if expert_bias else None)
        self.activation = activation
        # Only the arguments this layer has: the plain SiLU layer calls every kernel strategy as before.
        self._plain_experts = not expert_bias and activation == SILU
        # bool [T], set only while a padded decode graph runs (engine/rank/cuda_graph.py): padding rows route to
        # no expert (id -1), so they cost no expert weight reads and count in no expert's load.
        self.valid_rows_T: torch.Tensor | None = None
        # FP8 experts whose x the norm before them quantizes (moe/fp8_input.py): the Triton kernels on CUDA, where
        # that saves the experts' quantization launch; None elsewhere (the references quantize x as before).
        # (The norm's Triton tile holds whole groups: hidden sizes below one group, test models', keep the old way.)
        fp8_norm = (isinstance(self.expert_format, Fp8BlockExperts) and getattr(kernels, "name", "") == "triton"
                    and hidden_size >= self.expert_format.block[1])
        self.fp8_input = Fp8Input(self.expert_format.block[1]) if fp8_norm else None
        # MXFP4 blocks held in the Triton decode's pair order (kernels/mxfp4.to_pair_order), permuted once after
        # load (`process_weights_after_loading`) where the kernels' MXFP4 op reads that order; True once they are.
        self.mxfp4_pair_order = False
        # Rollout routing replay (moe/routing_capture.py): where this layer writes its routed ids; None: off.
        self.routing_capture = None
        # Its other half (moe/routing_replay.py): the step's given ids this layer uses instead of its router's.
        self.routing_replay = None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages(x_TD))

    def stages(self, x_TD: torch.Tensor, route_TX: torch.Tensor | None = None) -> Stages:
        """This layer as stages: a generator that yields each time an all-to-all is in flight (after
        dispatch_async, after combine_async; never without `ep`) and returns out_TD [T, D]. Whoever drives it
        runs other work at the yields: the shared experts, the other micro-batch (engine/rank/step_plan.py).
        route_TX: what the router reads when it is not x itself (Kimi K3's latent MoE routes the hidden states
        and sends their projection to the experts; gate_GD is then [G, X])."""
        route_TX = x_TD if route_TX is None else route_TX
        # Zero-computation experts take the unfused path: the fused op would count their ids as experts' load.
        route = self.router.route_args() if not self.zero_experts else None
        identity_T1 = None  # the zero-computation experts' weight per row (None: the layer has none)
        if route is not None:
            # Scores, top-k, the padding rows' ids (-1) and the expert-load count in one op: one launch with the
            # Triton kernels, where the ops one by one were ~11 at decode (kernels/router_topk.py); at a decode batch
            # the gate GEMV too (kernels/triton_router_gemv.py: its logits never make a round trip between launches).
            counts_G = self.stats.routing_counts(self.moe_index) if self.stats is not None else None
            counters = self.gate_counters_T
            if counters is not None and route_TX.shape[0] <= FUSED_MAX_TOKENS and counters.device == route_TX.device:
                weights_TK, ids_TK, logits_TG = self.kernels.gate_route_topk(
                    route_TX, self.gate_GD, self.gate_bias_G, self.router.top_k, **route,
                    bias_G=self.e_score_correction_bias_G, valid_T=self.valid_rows_T, counts_G=counts_G,
                    counters_T=counters)
            else:
                logits_TG = self._logits(route_TX)
                weights_TK, ids_TK = self.kernels.route_topk(logits_TG, self.router.top_k, **route,
                                                             bias_G=self.e_score_correction_bias_G,
                                                             valid_T=self.valid_rows_T, counts_G=counts_G)
            weights_TK, ids_TK = self._replayed(logits_TG, weights_TK, ids_TK)
            if self.routing_capture is not None:
                self.routing_capture.record(self.moe_index, ids_TK)
        else:  # a router with no fused form (gpt-oss's top-k-then-softmax, LongCat's softmax noaux_tc)
            logits_TG = self._logits(route_TX)
            weights_TK, ids_TK = self.router(logits_TG, self.e_score_correction_bias_G)
            weights_TK, ids_TK = self._replayed(logits_TG, weights_TK, ids_TK)
            if self.valid_rows_T is not None:
                ids_TK = ids_TK.masked_fill(~self.valid_rows_T[:, None], -1)
            if self.routing_capture is not None:  # the router's ids, zero-computation experts' included
                self.routing_capture.record(self.moe_index, ids_TK)
            if self.zero_experts:
                weights_TK, ids_TK, identity_T1 = self._zero_experts(weights_TK, ids_TK)
            if self.stats is not None:
                self.stats.record_routing(self.moe_index, ids_TK)
        if self.weight_on_input:  # x_TD * w in the model dtype, as transformers' Llama4TextMoe scales routed_in
            x_TD = x_TD * weights_TK.to(x_TD.dtype)
            weights_TK = torch.ones_like(weights_TK)
        if self.ep is None and self.lora_experts is not None and self.lora_experts.active():
            out_TD = self.lora_experts(self, x_TD, weights_TK, ids_TK)  # LoRA on the experts (engine/lora/)
        elif self.ep is None:
            out_TD = self.expert_format.run(self.kernels, self, x_TD, weights_TK, ids_TK)
        else:
            out_TD = yield from self._forward_ep(x_TD, weights_TK,
                                                 ids_TK if identity_T1 is None else self._ep_ids(ids_TK))
        return out_TD if identity_T1 is None else out_TD + x_TD * identity_T1.to(x_TD.dtype)

    def _logits(self, route_TX: torch.Tensor) -> torch.Tensor:
        """The gate matmul, [T, G]; gate_GD is float32 exactly when the router wants float32 logits (__init__)."""
        if route_TX.dtype != self.gate_GD.dtype:
            route_TX = route_TX.to(self.gate_GD.dtype)
        return F.linear(route_TX, self.gate_GD, self.gate_bias_G)

    def process_weights_after_loading(self, updated: set[int] | None = None) -> None:
        """After the loader filled the parameters (or a weight update the ones whose ids `updated` holds, in the
        checkpoint's layout): MXFP4 blocks permuted into the Triton decode's pair order where the kernels read it
        (the per-tile K loop then packs no bf16 pairs by byte permutes: docs/kernels.md, MXFP4). Only what the
        load or update wrote is permuted; EPLB moves, rollback and sleep copy the held bytes as they are."""
        # (gpt-oss's fused plan only: it writes each blocks parameter whole, so an update's ids name what it wrote;
        # the per-expert and split plans write views, and those blocks keep the published order)
        fmt = self.expert_format
        if type(fmt) is not Mxfp4Experts or not fmt.whole_blocks or not takes_pair_order(self.kernels):
            return
        for name in ("w13_blocks_EFSQ", "w2_blocks_EDSQ"):
            blocks = getattr(self, name)
            if updated is None or id(blocks) in updated:
                blocks.data.copy_(to_pair_order(blocks.data))
        self.mxfp4_pair_order = True

    def fp8_input_for(self, num_tokens: int) -> Fp8Input | None:
        """The handoff to give x's quantized copy to, where this layer's experts would take it for a batch of
        `num_tokens` rows (FP8 experts on the Triton kernels, local experts only, no LoRA on them), else None."""
        handoff = self.fp8_input
        if handoff is None or self.ep is not None or not handoff.wants(num_tokens):
            return None
        if self.lora_experts is not None and self.lora_experts.active():
            return None
        return handoff

    def _replayed(self, logits_TG: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's (weights, ids) with the rows this step gives replaced (moe/routing_replay.py); as they are
        when it gives none. (The expert-load count of the fused router op counted the router's own picks.)"""
        replay = self.routing_replay
        forced_TK = replay.take(self.moe_index, ids_TK.shape[0]) if replay is not None else None
        if forced_TK is None:
            return weights_TK, ids_TK
        return routing_replay.apply(self.router, logits_TG, weights_TK, ids_TK, forced_TK)

    def _zero_experts(self, weights_TK: torch.Tensor, ids_TK: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The picks of zero-computation experts taken out: (weights with those 0, ids with those -1, each row's
        identity weight [T, 1]: the sum of its zero picks' weights, times this rank's share)."""
        zero_TK = ids_TK >= self.num_experts
        identity_T1 = (weights_TK * zero_TK).sum(dim=-1, keepdim=True) * self.identity_share
        return weights_TK.masked_fill(zero_TK, 0.0), ids_TK.masked_fill(zero_TK, -1), identity_T1

    def _ep_ids(self, ids_TK: torch.Tensor) -> torch.Tensor:
        """Ids for the dispatch: -1 (routed nowhere) where the all-to-all takes such rows; else expert 0 with the
        weight 0 (one wasted expert slot per zero pick: the counted backends look every id up in the placement)."""
        if self.ep is not None and self.ep.all_to_all.accepts_padding_rows:
            return ids_TK
        return ids_TK.clamp(min=0)

    def _forward_ep(self, x_TD, weights_TK, ids_TK) -> Stages:
        # The phase times are the host time spent in each phase's calls (issue + wait), so with overlap they
        # measure the exposed communication, not the transfer.
        stats = self.stats
        a2a = self.ep.all_to_all
        lora: ExpertsHook | None = self.lora_experts
        if lora is not None and not lora.carries():
            lora = None
        if lora is not None:
            x_TD = _with_slots(x_TD, lora.token_slots())
        t0 = stats.clock() if stats else 0.0
        handle = a2a.dispatch_async(x_TD, ids_TK, weights_TK, self.ep_tables)
        t_issue = stats.clock() - t0 if stats else 0.0
        yield  # dispatch in flight
        t0 = stats.clock() if stats else 0.0
        recv_ND, meta = handle.wait()
        t1 = stats.clock() if stats else 0.0
        # The owner applies the routed weights and sums its experts' outputs, so
        # combine returns one row per (token, rank), not per (token, expert).
        slots_N = None
        if lora is not None:  # the senders' slots: one table on every rank (engine/lora/slot_table.py)
            recv_ND, slots_N = recv_ND[:, :-1].contiguous(), recv_ND[:, -1].round().long() - 1
            if not bool((slots_N >= 0).any()):  # host sync: no received row has an adapter, the fast kernels
                slots_N = None
        if lora is not None and slots_N is not None:
            y_ND = lora(self, recv_ND, meta.recv_topk_weights_NK, meta.recv_topk_ids_NK, slots_N)
        else:
            y_ND = self.expert_format.run(self.kernels, self, recv_ND, meta.recv_topk_weights_NK,
                                          meta.recv_topk_ids_NK)
        t2 = stats.clock() if stats else 0.0
        handle = a2a.combine_async(y_ND, meta)
        t_issue_combine = stats.clock() - t2 if stats else 0.0
        yield  # combine in flight
        t3 = stats.clock() if stats else 0.0
        out_TD = handle.wait()
        if stats is not None:
            stats.add_times(t_issue + t1 - t0, t2 - t1, t_issue_combine + stats.clock() - t3)
            stats.record_transfer(self.moe_index, meta)  # device counters: the layer reads no count on the host
        return out_TD

    def _extras(self) -> dict:
        """The expert kernel's optional arguments this layer has (none for a plain SiLU layer)."""
        if self._plain_experts:
            return {}
        return dict(b13_EF=self.b13_EF, b2_ED=self.b2_ED, activation=self.activation)


def takes_pair_order(kernels: Kernels) -> bool:
    """Whether the kernels' MXFP4 op reads blocks in kernels/mxfp4.to_pair_order's nibble order (its `pair_order`
    keyword: the Triton op; a layer that runs the reference for its experts, Kimi K3's SiTU one, keeps the
    checkpoint's order)."""
    op = getattr(kernels, "fused_moe_mxfp4", None)
    try:
        return op is not None and "pair_order" in inspect.signature(op).parameters
    except (TypeError, ValueError):  # (no signature to read: a builtin)
        return False


def _with_slots(x_TD: torch.Tensor, slots_T: torch.Tensor | None) -> torch.Tensor:
    """x with each token's LoRA slot + 1 as one more column (0: none, as a padded backend's empty rows read; exact
    in any float dtype for the few slots a table has: at most 256, engine/config/lora.py), so that it travels with
    the token's dispatch on every backend and mode (each moves rows of x as they are) and the receiver strips it.
    Combine moves [N, D] back."""
    col_T1 = ((slots_T[:, None] + 1).to(x_TD.dtype) if slots_T is not None
              else x_TD.new_zeros((x_TD.shape[0], 1)))
    return torch.cat([x_TD, col_T1], dim=1)
