"""DeepSeek-V4.1's DSpark draft layers as DeepSeek publishes them (config.json's num_nextn_predict_layers and dspark_*
fields, reader.read_dspark; the layers under `mtp.{i}.*`), the `DSparkStages` (engine/models/blocks/dspark.py)
registered for DeepseekV41ForCausalLM; speculative method "dspark" runs them (engine/spec/proposer/dspark.py, which
also says what DSpark computes: engine/config/dspark.py).

transformers' main branch (0a2080b4) reads V4.1 without its draft layers (its loader ignores `mtp.*`): there is no
reference forward to record; what is V4.1's own below follows the main model's blocks, which the draft layers are.

Checkpoint, S = num_nextn_predict_layers, L = num_hidden_layers:
    mtp.{i}.attn.*, attn_norm, ffn_norm, hc_attn_*, hc_ffn_*, ffn.*   a V4.1 block at layer index L + i: its attention
        sliding only (reader.draft_attention: no compressor, no indexer, the "main" rope), the q latent normed (no
        per-head q norm, unlike V4's), the window KV FP8 fake-quantized as the main layers'; its MoE V4's block with
        dspark_n_routed_experts experts, top dspark_num_experts_per_tok (0: the main layers' counts)
    mtp.0.main_proj.weight [D, len(taps) D], mtp.0.main_norm.weight [D]
    mtp.{S-1}.norm.weight [D]                                        the last norm (no hyper-head: see below)
    mtp.{S-1}.markov_head.{markov_w1,markov_w2 | embed,head}.weight [V, Rk]
and the main model's embedding and head (no copies).

The computation, for the context rows of the step's tokens and a block [anchor, mask, ...] x [R, B] at positions
P .. P + B - 1:
    main_x = main_norm(main_proj([mean_n(h^(l)) for l in dspark_target_layer_ids]))   (each layer's input streams)
    context row of stage i at t: fp8(rope(kv_norm(wkv_i(main_x_t)), t))                 (one shared head, key = value)
    streams = n copies of emb(block), the first collapse's mix stream 0 (the main model's embedding end)
    stage i: the main layers' lagged hyper-connections (blocks.LaggedHyperLayer: the attention's input collapsed with
        the previous site's mix, the FFN's with the attention site's), its attention over the last `sliding_window`
        context rows before P and the whole block (no causal mask inside it), sinks in the softmax
    base logits = head(norm(collapse(streams, the last stage's FFN-site mix)))           (as the main model's end)
Under TP a stage splits as a main layer does (its heads and output groups, its experts); the context rows (one
shared head) are whole on every rank. Under EP the stages' experts must be the main layers' count (their placement).

Legend: T tokens, R rows, B block slots, C context rows gathered per row, n streams, D hidden, H head dim, N heads.
"""
from __future__ import annotations

import dataclasses
from typing import Collection

import torch
import torch.nn.functional as F
from torch import nn

from moelink.moe.layer import ExpertParallel
from moelink.moe.stats import MoEStats
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.dspark import DSparkConfig
from ...config.model import ModelConfig
from ...tp.group import TensorParallel
from ..blocks.attention import AttentionKind
from ..blocks.context import BuildContext
from ..blocks.dspark import DSPARK_STAGES, BundledStages
from ..blocks.stream import StreamState
from ..blocks.ffn import FFN
from ..layers import ForwardContext, param
from ..registry import arch_spec
from .attention import Norm, V41Attention
from .blocks import LaggedHyperLayer, collapse, embed_streams
from .reader import draft_attention, published_format, read_dspark
from .rope import RopeTable
from .weights import dequant_plan


class DSparkAttention(V41Attention):
    """V4.1's attention over a DSpark block: `ctx.kv_caches[layer]` holds (context rows [R, C, H], which exist
    [R, C]), gathered by the drafter; the block's own KV is never cached (module docstring)."""

    def context_row(self, x_TD: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        """[T, H]: what a context token at `positions_T` leaves in this stage's cache."""
        return self.project(positions_T, x_TD)[1]

    def forward(self, positions_T: torch.Tensor, h_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q_TNH, kv_TH, _ = self.project(positions_T, h_TD)
        ctx_RCH, valid_RC = ctx.kv_caches[self.layer_idx]
        R, C, H = ctx_RCH.shape
        B = q_TNH.shape[0] // R
        keys_RKH = torch.cat([ctx_RCH.to(kv_TH.dtype), kv_TH.view(R, B, H)], dim=1)
        seen_RK = torch.cat([valid_RC, valid_RC.new_ones(R, B)], dim=1)
        q_RBNH = q_TNH.view(R, B, *q_TNH.shape[1:])
        out_TNH = torch.cat([self._attend(q_RBNH[r], keys_RKH[r], seen_RK[r][None, :].expand(B, -1))
                             for r in range(R)]) if R else torch.empty_like(q_TNH)
        return self.output(out_TNH, positions_T)


def stage_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the draft layers' expert counts (dspark_n_routed_experts, dspark_num_experts_per_tok; 0 or absent:
    the main layers')."""
    facts = read_dspark(cfg.hf_config)
    assert facts is not None and cfg.moe is not None
    E, K = facts.n_routed_experts or cfg.num_experts, facts.top_k or cfg.top_k
    if not 1 <= K <= E:
        raise ValueError(f"config.json dspark_num_experts_per_tok={K} is invalid: it must be in [1, "
                         f"dspark_n_routed_experts={E}].")
    router = dataclasses.replace(cfg.moe.router, num_experts=E, top_k=K)
    return dataclasses.replace(cfg, num_experts=E, top_k=K, moe=dataclasses.replace(cfg.moe, router=router))


class V41DSparkStages(BundledStages):
    """The S draft layers of a V4.1 checkpoint (module docstring), a `DSparkStages`."""

    def __init__(self, cfg: ModelConfig, dspark: DSparkConfig, kernels, device: torch.device, embed_VD, head_VD,
                 names: Collection[str] = (), ep: ExpertParallel | None = None, tp: TensorParallel | None = None):
        super().__init__(cfg, dspark, device, embed_VD, head_VD, names)
        self.spec = spec = arch_spec(cfg.architecture)
        D, dt, eps, S, L = cfg.hidden_size, cfg.dtype, cfg.rms_norm_eps, dspark.num_stages, cfg.num_layers
        scfg = stage_config(cfg)
        if ep is not None and scfg.num_experts != cfg.num_experts:
            raise ValueError(f"config.json dspark_n_routed_experts={scfg.num_experts} differs from n_routed_experts="
                             f"{cfg.num_experts}: {cfg.architecture}'s DSpark layers under expert parallelism place "
                             "their experts as the main layers' (serve without EP, or without speculative method "
                             "'dspark').")
        self.scfg = scfg
        attn = [draft_attention(cfg.layer_attention, L + i) for i in range(S)]
        self.window: int | None = attn[0].sliding_window
        self.head_dim = attn[0].head_dim
        rope = RopeTable(attn[0].rope, cfg.hf_config, cfg.max_model_len, device)
        self.expert_ids = list(range(scfg.num_experts)) if ep is None else list(ep.local_experts)
        self.moe_stats = MoEStats(S, scfg.num_experts, device)  # its routed experts counted apart from the model's
        kind = AttentionKind("attn", lambda c, j, a: DSparkAttention(a, D, {"main": rope, "compress": rope}, {},
                                                                     c.kernels, dt, c.device, tp=c.tp))
        self.blocks = nn.ModuleList()
        for i in range(S):
            ctx = BuildContext(scfg, spec, kernels, device, ep, self.moe_stats,
                               tp if tp is not None and tp.size > 1 else None, moe_index=i)
            self.blocks.append(LaggedHyperLayer(ctx, L + i, kind, attn[i], FFN.get(spec.ffn)))
        self.main_proj = param(D, len(dspark.target_layer_ids) * D, dtype=dt, device=device)
        self.main_norm, self.norm = Norm(D, eps, dt, device), Norm(D, eps, dt, device)

    def project_taps(self, taps_TX: torch.Tensor) -> torch.Tensor:
        return self.main_norm(F.linear(taps_TX, self.main_proj))

    def streams(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return embed_streams(self.cfg, x_TD)

    def finish(self, state: StreamState) -> torch.Tensor:
        assert isinstance(state, tuple)  # streams(): (x_TnD, pre_Tn)
        return self.norm(collapse(*state))

    def weight_plan(self) -> WeightPlan:
        last, L = f"mtp.{len(self.blocks) - 1}.", self.cfg.num_layers
        plan: WeightPlan = {"mtp.0.main_proj.weight": PlanEntry(self.main_proj, ()),
                            "mtp.0.main_norm.weight": PlanEntry(self.main_norm.weight, ()),
                            last + "norm.weight": PlanEntry(self.norm.weight, ()),
                            **self.markov.weight_plan(last + "markov_head.", self.names)}
        for i, b in enumerate(self.blocks):
            plan.update(b.weight_plan(f"mtp.{i}.", L + i, self.scfg, self.spec, self.expert_ids, frozenset()))
        block = published_format(self.cfg.architecture, self.cfg.hf_config, self.cfg.quantization)
        return dequant_plan(plan, self.names, block) if block is not None else plan


def _build(cfg: ModelConfig, dspark: DSparkConfig, kernels, device, embed_VD, head_VD, names, ep, tp):
    return V41DSparkStages(cfg, dspark, kernels, device, embed_VD, head_VD, names, ep, tp)


DSPARK_STAGES.add("DeepseekV41ForCausalLM", _build)

__all__ = ["DSparkAttention", "V41DSparkStages", "stage_config"]
