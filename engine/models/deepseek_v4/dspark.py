"""DeepSeek-V4's DSpark draft stages as DeepSeek publishes them (DeepSeek-V4-Flash-DSpark: config.json's dspark_*
fields, the stages under `mtp.{i}.*`), the `DSparkStages` (engine/models/blocks/dspark.py) registered for
DeepseekV4ForCausalLM; speculative method "dspark" runs them (engine/spec/proposer/dspark.py, which also says what
DSpark computes: engine/config/dspark.py).

Checkpoint (DeepSeek's inference `DSparkBlock`, SGLang's deepseek_v4_dspark loader), S = num_nextn_predict_layers:
    mtp.{i}.attn.*, attn_norm, ffn_norm, hc_attn_*, hc_ffn_*, ffn.*   a V4 block at layer index L + i (its kv norm
        `attn.kv_norm.weight`; sliding only: no compressor, no indexer; top-k routed), as the MTP module's block
    mtp.0.main_proj.weight [D, n D] (FP8 with `.scale` where published), mtp.0.main_norm.weight [D]
    mtp.{S-1}.norm.weight [D], hc_head_fn / hc_head_base / hc_head_scale   the last stage's hyper-head and norm
    mtp.{S-1}.markov_head.markov_w1.weight, markov_w2.weight [V, Rk]     (DeepSeek's own names: embed / head)
    mtp.{S-1}.confidence_head.*                                        not read (moelink verifies every draft)
and the main model's embedding and head (no copies).

The computation, for the context rows of the step's tokens and a block [anchor, mask, ...] x [R, B] at positions
P .. P + B - 1:
    main_x = main_norm(main_proj([mean_n(h^(l)) for l in dspark_target_layer_ids]))   (each layer's input streams)
    context row of stage i at position t: rope(kv_norm(wkv_i(main_x_t)), t)             (one shared head, key = value)
    x_RBnD = emb(block) on every stream;  x = block_i(x) for each stage                  (hyper-connections inside)
    block_i's attention: V4's (low-rank q, per-head q norm, sinks, grouped output), each block query over the last
        `sliding_window` context rows before P and the whole block (no causal mask inside it)
    base logits = head(norm(hc_head(x)))
Under TP a stage splits as the MTP module's block does (its heads and output groups, its experts); the context rows
(one shared head) are whole on every rank; the embedding and head are the drafter's whole tables.

Legend: T tokens, R rows, B block slots, C context rows gathered per row, n streams, D hidden, H head dim, N heads.
"""
from __future__ import annotations

from typing import Collection

import torch
from torch import nn

from moelink.kernels.compressed_attention import reference_rms_norm_f32
from moelink.moe.layer import ExpertParallel
from moelink.moe.stats import MoEStats
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.dspark import DSparkConfig
from ...config.model import ModelConfig
from ...tp.group import TensorParallel
from ..blocks.dspark import DSPARK_STAGES, BundledStages
from ..blocks.stream import StreamState
from ..hyper_connections import HyperHead
from ..layers import ForwardContext
from ..linear import Linear
from ..registry import arch_spec
from ..rope import rope_inv_freq
from .attention import DSV4Attention, RopeTable
from .blocks import Norm, mtp_layer
from .reader import mtp_attention, read_dsv4_quantization
from .weights import dsv4_linear_method, fp8_dequant_plan, published_linear_plan


class DSparkAttention(DSV4Attention):
    """V4's attention over a DSpark block: `ctx.kv_caches[layer]` holds (context rows [R, C, H], which exist
    [R, C]), gathered by the drafter; the block's own kv is never cached (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.compressor is not None:
            raise ValueError(f"DSpark stage {self.layer_idx} must be sliding only, not {self.cfg.layer_kind}.")
        self.num_paged = 2

    def context_row(self, x_TD: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        """[T, H]: what a context token at `positions_T` leaves in this stage's cache."""
        kv_TH = reference_rms_norm_f32(self.wkv(x_TD), self.kv_norm_H, self.cfg.rms_norm_eps)
        return self.rope.rotate(kv_TH[:, None, :], positions_T)[:, 0, :]

    def _decode(self, q_TNH, kv_TH, rows, idx, ctx: ForwardContext, paged, state) -> torch.Tensor:
        return self._block(q_TNH, kv_TH, paged)

    def _sequences(self, q_TNH, kv_TH, rows, idx, ctx: ForwardContext, paged, state) -> torch.Tensor:
        return self._block(q_TNH, kv_TH, paged)

    def _block(self, q_TNH, kv_TH, paged) -> torch.Tensor:
        ctx_RCH, valid_RC = paged
        R, C, H = ctx_RCH.shape
        B = q_TNH.shape[0] // R
        keys_RSH = torch.cat([ctx_RCH.to(kv_TH.dtype), kv_TH.view(R, B, H)], dim=1)
        seen_RS = torch.cat([valid_RC, valid_RC.new_ones(R, B)], dim=1)
        return self.sink_attention(q_TNH, keys_RSH.repeat_interleave(B, 0).to(q_TNH.dtype),
                                   seen_RS.repeat_interleave(B, 0), self.sinks_N, self.cfg.softmax_scale)


class DSV4DSparkStages(BundledStages):
    """The S stages of a V4 checkpoint (module docstring), a `DSparkStages`."""

    def __init__(self, cfg: ModelConfig, dspark: DSparkConfig, kernels, device: torch.device, embed_VD, head_VD,
                 names: Collection[str] = (), ep: ExpertParallel | None = None, tp: TensorParallel | None = None):
        super().__init__(cfg, dspark, device, embed_VD, head_VD, names)
        self.spec = spec = arch_spec(cfg.architecture)
        D, dt, eps, S = cfg.hidden_size, cfg.dtype, cfg.rms_norm_eps, dspark.num_stages
        self.quant = read_dsv4_quantization(cfg.architecture, cfg.hf_config, cfg.quantization)
        attention = mtp_attention(cfg.layer_attention, cfg.hf_config)
        self.window: int | None = attention.sliding_window
        inv_freq, factor = rope_inv_freq(attention.rope, cfg.hf_config)
        rope = RopeTable(inv_freq, factor, cfg.max_model_len, device)
        self.expert_ids = list(range(cfg.num_experts)) if ep is None else list(ep.local_experts)
        self.moe_stats = MoEStats(S, cfg.num_experts, device)  # its routed experts counted apart from the model's
        self.blocks = nn.ModuleList(
            mtp_layer(cfg, spec, cfg.num_layers + i, {"main": rope, "compress": rope}, kernels, device, ep,
                      self.moe_stats, self.quant, attention=attention, moe_index=i, attention_cls=DSparkAttention,
                      tp=tp) for i in range(S))
        self.head_dim = attention.head_dim
        self.main_proj = Linear(len(dspark.target_layer_ids) * D, D, dsv4_linear_method(self.quant), kernels, dt,
                                device)
        self.main_norm, self.norm = Norm(D, eps, device), Norm(D, eps, device)
        self.hc_head = HyperHead(cfg.hyper_connections, D, eps, device)

    def project_taps(self, taps_TX: torch.Tensor) -> torch.Tensor:
        return self.main_norm(self.main_proj(taps_TX)).to(self.dtype)

    def streams(self, x_TD: torch.Tensor) -> torch.Tensor:
        n = self.cfg.hyper_connections.hc_mult
        return x_TD[:, None, :].expand(-1, n, -1).contiguous()

    def finish(self, state: StreamState) -> torch.Tensor:
        assert isinstance(state, torch.Tensor)  # streams(): the n streams x_TnD
        return self.norm(self.hc_head(state))

    def weight_plan(self) -> WeightPlan:
        S, last = len(self.blocks), f"mtp.{len(self.blocks) - 1}."
        plan: WeightPlan = {**published_linear_plan(self.main_proj, "mtp.0.main_proj.weight"),
                            "mtp.0.main_norm.weight": PlanEntry(self.main_norm.weight, ()),
                            last + "norm.weight": PlanEntry(self.norm.weight, ()),
                            last + "hc_head_fn": PlanEntry(self.hc_head.fn_nnD, ()),
                            last + "hc_head_base": PlanEntry(self.hc_head.base_n, ()),
                            last + "hc_head_scale": PlanEntry(self.hc_head.scale_1, ()),
                            **self.markov.weight_plan(last + "markov_head.", self.names)}
        for i, b in enumerate(self.blocks):
            p = f"mtp.{i}."
            block = b.weight_plan(p, self.cfg.num_layers + i, self.cfg, self.spec, self.expert_ids, frozenset())
            plan.update({k.replace(".attn.norm.weight", ".attn.kv_norm.weight"): e for k, e in block.items()})
        assert S >= 1
        if self.quant is not None:
            plan = fp8_dequant_plan(plan, self.names, self.quant.block)
        return plan


def _build(cfg: ModelConfig, dspark: DSparkConfig, kernels, device, embed_VD, head_VD, names, ep, tp):
    return DSV4DSparkStages(cfg, dspark, kernels, device, embed_VD, head_VD, names, ep, tp)


DSPARK_STAGES.add("DeepseekV4ForCausalLM", _build)

__all__ = ["DSV4DSparkStages", "DSparkAttention"]
