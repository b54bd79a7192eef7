"""The MTP drafter: the checkpoint's next-n prediction layer (engine/spec/heads/mtp.py) drafting inside the step's
device work (speculative method "mtp"): a ChainDrafter (engine/spec/proposer/chain.py: catch-up over the step's
tokens shifted by one, then k - 1 chained greedy drafts, scratch blocks, no host sync) over `MTPDraftLayer`.

Legend: T tokens of the step's flat batch, D hidden, R rows that sample this step.

The conditioning state: the MTP row at position t reads (h_t, tok_{t+1}) and predicts tok_{t+2}, at the main
model's position t and KV slot. h_t is the main model's FINAL-NORMED hidden state (what
`MoEDecoderForCausalLM.forward` returns): vLLM and SGLang feed that one, and the published MTP weights were
trained with it; DeepSeek-V3's report draws the pre-norm state, and the difference shows only as drafts accepted
less often (the verify step keeps the output exact either way). A chained step feeds the layer its own output
(the state before shared_head.norm; a Qwen3-Next / Qwen3.5 MTP module's is final-normed, as vLLM chains it:
engine/spec/heads/qwen_mtp.py) and its last draft. The layer's cache is the main model's kind and dtype (MLA latent
or GQA, fp8 with --kv-cache-dtype fp8), one extra cache layer at index num_hidden_layers.

Hybrid models (Qwen3-Next, Qwen3.5: linear-attention layers beside full attention): the MTP module is one full-
attention layer, so it keeps no per-sequence state; the main model's verify step rolls its linear-attention
states back past the rejected drafts (GatedDeltaNet.replay_states), as for any drafter's drafts.

DeepSeek-V4: its MTP module (engine/models/deepseek_v4/mtp.py) reads the main model's hyper-connection streams before the
hyper-head (not a final-normed state: DeepSeek's MTPBlock takes them), captured by the main forward as EAGLE-3's
states are (so, as for EAGLE-3, no CUDA graphs), and keeps a paged window as its cache (`StreamsDraftLayer`). The
main model's window and compressor rings are rolled back past rejected drafts by the model itself
(engine/models/deepseek_v4/rollback.py).

Expert parallelism: the MTP layer's MoE dispatches like a main layer, so every rank runs k MTP forwards per step
that runs a forward anywhere (catch-up, k - 1 chain steps; `moe_only_stages` where it has no rows), in the same
order. With num_nextn_predict_layers > 1 the drafter runs module 0 only (chained k times, as vLLM does for
DeepSeek's one published module).

Tensor parallelism: every rank of a TP group runs the layer, built with the group like a main layer
(engine/spec/heads/mtp.py: heads and experts split, vocab-parallel embedding and head, logits all-gathered), so the
group's ranks take the same greedy drafts from the same gathered logits, and run the same collectives in the same
order (they run the same SchedulerOutput; the verify step's accepted counts and tokens are the group's first
rank's: engine/spec/verify.py). Its cache holds the rank's heads as a main layer's does (MLA: the latent,
whole).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from moelink.moe.layer import MoEOnlyStages

from ...config.model import ModelConfig
from ...models.registry import arch_spec
from ...models.layers import ForwardContext
from ...rank.loader import load_plan, open_checkpoint
from ...tp.attention import shard_attention
from ...tp.group import TensorParallel
from ..heads import MTPLayer, QwenMTPLayer, make_mtp_layer
from .chain import SCRATCH_ROWS, ChainDrafter, ChainPlan

logger = logging.getLogger(__name__)

# Sampled rows the first scratch allocation serves (chain.SCRATCH_ROWS); more grow it (rare).
_SCRATCH_ROWS = SCRATCH_ROWS


def load_mtp_layer(cfg: ModelConfig, model, kernels, device: torch.device, ep=None,
                   load_format: str = "auto", tp: TensorParallel | None = None,
                   read_bytes: dict[str, int] | None = None) -> nn.Module:
    """MTP module 0 of `cfg`'s checkpoint (or random, load_format "dummy"), its routed experts this rank's share
    under `ep`, its layers split over `tp` (reading only its shards); its embedding and head are `model`'s where
    the checkpoint has no copy (under TP: their shards, or this rank's shard of the copy). The architecture's layout
    decides the module (spec/heads/mtp.make_mtp_layer: DeepSeek's next-n layer or Qwen3-Next / Qwen3.5's `mtp.*`).
    `read_bytes`: filled with the bytes read per checkpoint tensor (engine/rank/loader.load_plan)."""
    if cfg.num_nextn_predict_layers < 1:
        raise ValueError(f"speculative_config.method='mtp' is invalid for this checkpoint: its config.json has "
                         f"num_nextn_predict_layers={cfg.num_nextn_predict_layers} (no MTP layers).")
    if cfg.num_nextn_predict_layers > 1:
        logger.info("checkpoint has %d MTP modules: the drafter chains module 0 only.", cfg.num_nextn_predict_layers)
    checkpoint = open_checkpoint(cfg, load_format, device, mtp_layers=1)
    names = frozenset(checkpoint.keys())
    layer = make_mtp_layer(cfg, arch_spec(cfg.architecture), 0, kernels, device, ep, names,
                           embed_tokens=model.embed_tokens, lm_head=model.lm_head, tp=tp)
    plan = layer.weight_plan(names)
    missing = sorted(n for n in plan if n not in checkpoint)
    if missing:
        raise ValueError(f"checkpoint {cfg.model!r} is missing MTP tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + ": speculative method 'mtp' reads the whole MTP layer.")
    load_plan(checkpoint, plan, device, read_bytes=read_bytes)
    layer.process_weights_after_loading()
    return layer.eval()


# One step's host half (the chain drafter's plan; the name MTP's callers know).
MTPPlan = ChainPlan


class MTPDraftLayer:
    """The MTP layer as a chain drafter's DraftLayer (module docstring)."""

    aux_layers: tuple[int, ...] = ()
    has_experts = True  # its MoE dispatches like a main layer's (module docstring)

    def __init__(self, cfg: ModelConfig, layer: MTPLayer | QwenMTPLayer, tp_size: int = 1):
        self.module = layer
        self.kv_cache_index = layer.layer_index
        # The rank's heads' cache under TP, as the main layers' (engine/tp/attention.tp_local_config).
        self.attention, self.cache_dtype = shard_attention(cfg.attention, tp_size), cfg.cache_dtype

    def condition(self, h_TD: torch.Tensor, aux: list[torch.Tensor]) -> torch.Tensor:
        return h_TD  # the main model's final-normed state (module docstring)

    def __call__(self, positions_T, input_ids_T, hidden_TD, ctx: ForwardContext) -> torch.Tensor:
        return self.module(positions_T, input_ids_T, hidden_TD, ctx)

    def greedy(self, y_RD: torch.Tensor) -> torch.Tensor:
        return self.module.compute_logits(y_RD).argmax(dim=-1)

    def moe_only_stages(self) -> MoEOnlyStages:
        return self.module.moe_only_stages()


class StreamsDraftLayer:
    """An MTP layer over the main model's hyper-connection streams (DeepSeek-V4's, engine/models/deepseek_v4/mtp.py)
    as a chain drafter's DraftLayer. It conditions on the main model's n streams before its hyper-head, which the main
    forward captures after its last layer (`aux_layers`; the "hyper" residual kind keeps them flat, [T, n D]); the
    chain drafter moves [T, n D] rows and never looks inside, so this adapter reshapes them to [T, n, D] for the layer
    and back. Its cache is the layer's own (`layer.cache`: V4's paged window) in the model dtype."""

    has_experts = True

    def __init__(self, cfg: ModelConfig, layer: Any):
        self.module = layer
        self.kv_cache_index = layer.layer_index
        self.aux_layers = (cfg.num_layers,)
        self.attention, self.cache_dtype = layer.cache, cfg.dtype
        self.streams = cfg.hyper_connections.hc_mult

    def condition(self, h_TD: torch.Tensor, aux: list[torch.Tensor]) -> torch.Tensor:
        return aux[0]

    def __call__(self, positions_T, input_ids_T, hidden_TX, ctx: ForwardContext) -> torch.Tensor:
        y_TnD = self.module(positions_T, hidden_TX.view(hidden_TX.shape[0], self.streams, -1), input_ids_T, ctx)
        return y_TnD.flatten(1)

    def greedy(self, y_RX: torch.Tensor) -> torch.Tensor:
        return self.module.compute_logits(y_RX.view(y_RX.shape[0], self.streams, -1)).argmax(dim=-1)

    def moe_only_stages(self) -> MoEOnlyStages:
        return self.module.moe_only_stages()


class MTPDrafter(ChainDrafter):
    """The runner's device drafter for method "mtp" (module docstring)."""

    def __init__(self, cfg: ModelConfig, model, kernels, device: torch.device, ep, k: int, block_size: int,
                 load_format: str = "auto", tp: TensorParallel | None = None):
        self.cfg = cfg
        layer = load_mtp_layer(cfg, model, kernels, device, ep, load_format, tp)
        tp_size = tp.size if tp is not None else 1
        draft = (StreamsDraftLayer(cfg, layer) if getattr(layer, "conditions_on_streams", False)
                 else MTPDraftLayer(cfg, layer, tp_size))
        super().__init__(draft, cfg.max_model_len, device, ep, k, block_size)

    def _scratch_rows(self) -> int:
        return _SCRATCH_ROWS  # this module's (tests shrink it to make the scratch grow mid-run)


__all__ = ["StreamsDraftLayer", "MTPDraftLayer", "MTPDrafter", "MTPPlan", "load_mtp_layer"]
