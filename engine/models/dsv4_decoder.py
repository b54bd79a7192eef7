"""DeepSeek-V4's decoder (issue 45): embedding → hc_mult residual streams → layers → hyper-head → norm.

A layer: the streams collapse (engine/models/hyper_connections.py) into the attention's input (attn_norm first),
the attention's output spreads back over the streams; the same around the MoE block (ffn_norm): routed experts
(moe/token_routing.TokenRoutedMoELayer: by the token-id table on the hash layers, by sqrt(softplus) scores with a
correction bias on the rest; SwiGLU clamped at swiglu_limit) plus one shared expert, clamped the same way. With
DeepSeek's published formats, the attention's linears and the shared expert are held FP8 (W8A8,
engine/models/dsv4_weights.py), the routed experts FP4 (packed) or FP8 (dequantized at load).

Under tensor parallelism (`tp`, docs/tensor-parallelism.md) the attention splits its heads (dsv4_attention.py), the
hyper-connections (per token, the same input on every rank after the attention's all-reduce) are whole on every rank,
the embedding and LM head are vocab-parallel (engine/tp/vocab.py), and the MoE block runs one of two ways
(engine/tp/experts.py): with the experts in EP each rank takes its slice of the tokens (and of their ids, which
the hash-routed layers route by) into the router, the all-to-all and the shared expert, the slices all-gathered; with
expert_parallel_size 1 every rank holds every expert's 1/N of the intermediate channels (routed and shared: w1 / w3
rows, w2 columns) and the block's partial output is all-reduced once.

The attention kind is engine/models/dsv4_attention.py; its cache (paged entries + state slots) is the rank's. The
module answers what the runner asks of a model (`stages`, `compute_logits`, `weight_plan`, `set_valid_rows`,
`forward_moe_only`, `moe_stats`), as MoEDecoderForCausalLM does.

Legend: T tokens, n streams, D hidden, I moe_intermediate_size, V vocab.
"""
from __future__ import annotations

from typing import Collection

import torch
from torch import nn

from moelink.kernels.dsv4 import reference_rms_norm_f32
from moelink.kernels.moe import MoEActivation
from moelink.moe.expert_weights import make_expert_format
from moelink.moe.expert_weights_dsv4 import Dsv4Fp4Experts
from moelink.moe.layer import ExpertParallel, MoEOnlyStages, Stages, run_stages
from moelink.moe.router import make_router
from moelink.moe.stats import MoEStats
from moelink.moe.token_routers import HashRouter
from moelink.moe.token_routing import TokenRoutedMoELayer
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ..config.architectures import ArchSpec
from ..config.dsv4 import DSV4AttentionConfig
from ..config.dsv4_quant import DSV4Quantization, read_dsv4_quantization
from ..config.model import ModelConfig
from ..tp.experts import ExpertShard, token_sliced_stages
from ..tp.group import TensorParallel
from ..tp.linear import ColumnParallel, RowParallel
from ..tp.vocab import VocabShard
from .dsv4_attention import DSV4Attention, RopeTable
from .dsv4_rollback import StateRollback
from .dsv4_weights import dsv4_linear_method, fp8_dequant_plan, published_linear_plan
from .hyper_connections import HyperConnection, HyperHead
from .layers import ForwardContext, param
from .linear import Linear, LinearMethod
from .rope import rope_inv_freq


class Norm(nn.Module):
    """V4's RMSNorm: float32 weight, computed in float32 (kernels/dsv4.reference_rms_norm_f32)."""

    def __init__(self, size: int, eps: float, device=None):
        super().__init__()
        self.weight = param(size, dtype=torch.float32, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_rms_norm_f32(x, self.weight, self.eps)


class ClampedMLP(nn.Module):
    """The shared expert: down(silu(min(gate, limit)) * clamp(up, -limit, limit)); w1 (gate) and w3 (up) [I, D], w2
    (down) [D, I], each a `Linear` as `method` holds it (float, or FP8 as published). `shard`: an ExpertShard (the
    experts split over a TP group): this rank's channels [i0, i0 + w), w2's partial output left for the MoE block's
    one all-reduce."""

    def __init__(self, hidden: int, inter: int, limit: float, method: LinearMethod, kernels, dtype, device=None,
                 shard: ExpertShard | None = None, tp: TensorParallel | None = None):
        super().__init__()
        rows = cols = None
        if shard is not None:
            rows, cols = ColumnParallel((shard.i0,), (shard.w,)), RowParallel(tp, shard.i0, shard.w, reduce=False)
            inter = shard.w
        # w1 and w3 apart, not stacked: a float checkpoint runs the very F.linear calls it always did.
        self.w1 = Linear(hidden, inter, method, kernels, dtype, device, parallel=rows)
        self.w3 = Linear(hidden, inter, method, kernels, dtype, device, parallel=rows)
        self.w2 = Linear(inter, hidden, method, kernels, dtype, device, parallel=cols)
        self.act = MoEActivation("silu_clamp", limit=limit)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x_TD), self.w3(x_TD)))

    def weight_plan(self, p: str) -> WeightPlan:
        """`{p}w1.weight`, ... (and each FP8 one's `.scale`)."""
        plan: WeightPlan = {}
        for name in ("w1", "w3", "w2"):
            plan.update(published_linear_plan(getattr(self, name), f"{p}{name}.weight"))
        return plan


def expert_format(quant: DSV4Quantization | None):
    """FP4 experts stay packed (MXFP4's storage and W4A16 kernels); float and FP8 experts are held in the model
    dtype (FP8 ones dequantized at load: engine/models/dsv4_weights.py)."""
    return Dsv4Fp4Experts() if quant is not None and quant.expert_dtype == "fp4" else make_expert_format(None, False)


class DSV4DecoderLayer(nn.Module):
    mixer_name = "attn"

    def __init__(self, cfg: ModelConfig, i: int, ropes: dict, kernels, device, ep, stats: MoEStats,
                 quant: DSV4Quantization | None = None, attention: DSV4AttentionConfig | None = None,
                 moe_index: int | None = None, attention_cls: type = DSV4Attention, tp: TensorParallel | None = None):
        """Main layer i; an MTP layer (engine/spec/heads/dsv4_mtp.py) passes its own `attention` config, the row
        `moe_index` of its own MoEStats (its layer index is past the main layers' configs) and its attention class
        (a paged window: the drafter's cache). `tp`: the rank's TensorParallel (None: whole; module docstring)."""
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 else None
        D, dt, hc, eps = cfg.hidden_size, cfg.dtype, cfg.hyper_connections, cfg.rms_norm_eps
        self.attn_hc = HyperConnection(hc, D, eps, device, kernels)
        self.ffn_hc = HyperConnection(hc, D, eps, device, kernels)
        self.attn_norm, self.ffn_norm = Norm(D, eps, device), Norm(D, eps, device)
        self.attn = attention_cls(attention or cfg.attention_for(i), i, D, ropes, kernels, dt, device, quant,
                                  tp=self.tp)
        m = cfg.moe
        router = (HashRouter(cfg.top_k, m.router.routed_scaling_factor) if i in cfg.hash_layers
                  else make_router(m.router))
        # Under TP without EP every rank holds every expert's 1/N of the channels (engine/tp/experts.py); with EP the
        # experts are placed whole and the block runs on the rank's token slice.
        self.expert_shard = ExpertShard(self.tp, cfg.moe_intermediate_size) if self.tp and ep is None else None
        inter = self.expert_shard.w if self.expert_shard else cfg.moe_intermediate_size
        self.moe = TokenRoutedMoELayer(D, inter, cfg.num_experts, router, kernels, dt, device,
                                       ep=ep, moe_index=cfg.sparse_layers.index(i) if moe_index is None else moe_index,
                                       stats=stats, expert_format=expert_format(quant),
                                       activation=MoEActivation("silu_clamp", limit=m.swiglu_limit),
                                       vocab_size=cfg.vocab_size)
        self.shared = ClampedMLP(D, cfg.moe_intermediate_size, m.swiglu_limit, dsv4_linear_method(quant), kernels, dt,
                                 device, shard=self.expert_shard, tp=self.tp)

    def stages(self, positions_T, x_TnD, input_ids_T, ctx: ForwardContext) -> Stages:
        h_TD, mix = self.attn_hc.collapse(x_TnD)
        x_TnD = self.attn_hc.residual(x_TnD, self.attn(positions_T, self.attn_norm(h_TD), ctx), mix)
        h_TD, mix = self.ffn_hc.collapse(x_TnD)
        h_TD = self.ffn_norm(h_TD)
        if self.tp is None:
            y_TD = yield from self.moe_stages(h_TD, input_ids_T)
        elif self.expert_shard is not None:  # every token, this rank's channels of every expert: one all-reduce
            y_TD = self.tp.all_reduce((yield from self.moe_stages(h_TD, input_ids_T)))
        else:  # experts in EP: this rank's token slice (and its ids) through the block, the slices gathered
            y_TD = yield from token_sliced_stages(self.tp, self.moe, _WithIds(self, input_ids_T), h_TD)
        return self.ffn_hc.residual(x_TnD, y_TD, mix)

    def moe_stages(self, h_TD: torch.Tensor, input_ids_T: torch.Tensor) -> Stages:
        """Routed experts + the shared expert on h's rows (their token ids beside them); yields while the EP
        dispatch and combine are in flight, the shared expert computed during the dispatch."""
        routed = self.moe.stages(h_TD, input_ids_T)
        try:
            next(routed)  # router run, dispatch issued (expert parallelism only)
        except StopIteration as done:
            return done.value + self.shared(h_TD)
        shared_TD = self.shared(h_TD)  # while the dispatch is in flight
        yield
        routed_TD = yield from routed
        return routed_TD + shared_TD

    def weight_plan(self, i: int, spec: ArchSpec, expert_ids: list[int], num_experts: int,
                    prefix: str | None = None) -> WeightPlan:
        """Names under `prefix` (default "model.layers.{i}."; an MTP layer's "mtp.{k}."). The FP8 linears' entries
        (float8_e4m3fn weights, `.scale` into float32) are ones `fp8_dequant_plan` leaves as they are."""
        p = f"model.layers.{i}." if prefix is None else prefix
        plan: WeightPlan = {**self.attn_hc.weight_plan(p + "hc_attn"), **self.ffn_hc.weight_plan(p + "hc_ffn"),
                            p + "attn_norm.weight": PlanEntry(self.attn_norm.weight, ()),
                            p + "ffn_norm.weight": PlanEntry(self.ffn_norm.weight, ())}
        plan.update(self.attn.weight_plan(p + "attn."))
        f = f"{p}{spec.moe_prefix}."
        plan[f + "gate.weight"] = PlanEntry(self.moe.gate_GD, ())
        if self.moe.tid2eid_VK is not None:
            plan[f + "gate.tid2eid"] = PlanEntry(self.moe.tid2eid_VK, ())
        if self.moe.e_score_correction_bias_G is not None:
            plan[f + spec.correction_bias] = PlanEntry(self.moe.e_score_correction_bias_G, ())
        if self.expert_shard is not None:  # this rank's channels of every expert (FP8 ones: dequantized at load)
            plan.update(self.expert_shard.float_plan(self.moe, f, False, expert_ids, spec.expert_names))
        else:
            plan.update(self.moe.expert_format.weight_plan(self.moe, f, False, expert_ids, (), spec.expert_names))
        plan.update(self.shared.weight_plan(f + "shared_experts."))
        return plan


class _WithIds:
    """The MoE block of `layer` as engine/tp/experts.token_sliced_stages runs it (`stages(h_tD)` on the rank's token slice),
    with the slice's token ids beside it (the hash-routed layers route by them)."""

    def __init__(self, layer: DSV4DecoderLayer, input_ids_T: torch.Tensor):
        self.layer, self.input_ids_T = layer, input_ids_T

    def stages(self, h_tD: torch.Tensor) -> Stages:
        lo, hi = self.layer.tp.token_rows(self.input_ids_T.shape[0])  # the slice token_sliced_stages cut
        return self.layer.moe_stages(h_tD, self.input_ids_T[lo:hi])


def rope_tables(cfg: ModelConfig, device, labels=("main", "compress")) -> dict:
    """The RopeTables of `labels` ("main": sliding layers', "compress": CSA / HCA layers') that some layer uses;
    "compress" falls back to "main" (DSV4Attention asks for both)."""
    ropes = {}
    for label in labels:
        rope = next((a.rope for a in cfg.layer_attention if a.rope.layer_type == label), None)
        if rope is not None:
            inv_freq, factor = rope_inv_freq(rope, cfg.hf_config)
            ropes[label] = RopeTable(inv_freq, factor, cfg.max_model_len, device)
    ropes.setdefault("compress", ropes.get("main"))
    return ropes


class DeepseekV4ForCausalLM(nn.Module):
    """The V4 model on the engine's reference path (module docstring)."""

    def __init__(self, cfg: ModelConfig, spec: ArchSpec, kernels, device: torch.device,
                 ep: ExpertParallel | None = None, checkpoint_names: Collection[str] | None = None, tp: TensorParallel | None = None):
        """tp: the rank's TensorParallel (engine/tp/group.py; None: no TP): the layers split over it, the
        embedding and LM head vocab-parallel (module docstring)."""
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 else None
        if cfg.hyper_connections is None:
            raise ValueError(f"architecture {cfg.architecture}: its ModelConfig has no hyper_connections.")
        if cfg.kv_cache_dtype not in (None, cfg.dtype, torch.float8_e4m3fn):  # fp8: e4m3 rows with scales only
            raise ValueError(f"kv_cache_dtype={cfg.kv_cache_dtype} is not supported for {cfg.architecture}: its fp8 "
                             "cache is float8_e4m3fn with scales (kv_cache_dtype='fp8') or the model dtype ('auto').")
        self.cfg, self.spec = cfg, spec
        self.quant = read_dsv4_quantization(cfg.architecture, cfg.hf_config, cfg.quantization)
        self.expert_ids = list(range(cfg.num_experts)) if ep is None else list(ep.local_experts)
        self.moe_stats = MoEStats(len(cfg.sparse_layers), cfg.num_experts, device)
        D, dt = cfg.hidden_size, cfg.dtype
        # Vocab rows this rank holds: all, or its ceil(V / N) shard under TP (rows past V stay zero).
        self.vocab = VocabShard(cfg.vocab_size, self.tp)
        self.embed_tokens = nn.Parameter(torch.zeros(self.vocab.rows, D, dtype=dt, device=device), requires_grad=False)
        self.lm_head = nn.Parameter(torch.zeros(self.vocab.rows, D, dtype=dt, device=device), requires_grad=False)
        ropes = rope_tables(cfg, device)
        self.ropes = nn.ModuleDict(ropes)
        self.layers = nn.ModuleList(DSV4DecoderLayer(cfg, i, ropes, kernels, device, ep, self.moe_stats, self.quant,
                                                     tp=self.tp) for i in range(cfg.num_layers))
        self.hc_head = HyperHead(cfg.hyper_connections, D, cfg.rms_norm_eps, device)
        self.norm = Norm(D, cfg.rms_norm_eps, device)
        self.rollback = StateRollback([layer.attn.num_paged for layer in self.layers])  # type: ignore[misc]  # ints

    def forward(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return run_stages(self.stages(input_ids_T, positions_T, ctx))

    def stages(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext) -> Stages:
        """The final-normed hidden states [T, D]; yields while a MoE all-to-all is in flight (EP only)."""
        self.rollback.snapshot(ctx, positions_T)  # a verify step: its sequences' states copied first
        x_TD = self.vocab.embed(input_ids_T, self.embed_tokens)
        x_TnD = x_TD.unsqueeze(1).expand(-1, self.cfg.hyper_connections.hc_mult, -1).contiguous()
        for layer in self.layers:
            x_TnD = yield from layer.stages(positions_T, x_TnD, input_ids_T, ctx)
        if ctx.aux is not None:  # the MTP drafter conditions on the streams before the hyper-head (dsv4_mtp.py)
            ctx.aux.take(len(self.layers), x_TnD.flatten(1), None)
        return self.norm(self.hc_head(x_TnD))

    def compute_logits(self, h_SD: torch.Tensor) -> torch.Tensor:
        """[S, V] on every rank (under TP each rank's vocab shard, all-gathered: every rank samples the same)."""
        return self.vocab.logits(h_SD, self.lm_head)

    def set_valid_rows(self, valid_T: torch.Tensor | None) -> None:
        for layer in self.layers:
            layer.moe.valid_rows_T = valid_T

    def forward_moe_only(self) -> None:
        run_stages(self.moe_only_stages())

    def moe_only_stages(self) -> MoEOnlyStages:
        """An empty micro-batch under EP: this rank joins every MoE layer's dispatch and combine."""
        x_0D = self.embed_tokens.new_zeros(0, self.cfg.hidden_size)
        ids_0 = torch.zeros(0, dtype=torch.long, device=x_0D.device)
        for layer in self.layers:
            yield from layer.moe.stages(x_0D, ids_0)

    def process_weights_after_loading(self) -> None:
        return None

    def replay_states(self, num_accepted_S: torch.Tensor) -> None:
        """After a verify step's sampling: the verifying sequences' window and compressor rings back to their
        accepted tokens (engine/models/dsv4_rollback.py); num_accepted_S in the verify group's order."""
        self.rollback.restore(num_accepted_S)

    def weight_plan(self, checkpoint_names: Collection[str] | None = None) -> WeightPlan:
        """The checkpoint's names as save_pretrained writes them (the published layer names under `model.`), or as
        DeepSeek publishes them (no `model.` prefix, `embed.weight`, `hc_head_fn`: `published_name`) where the
        checkpoint holds those; with V4's published formats, the FP8 linears held FP8 with their `.scale`, FP8
        routed experts dequantized (engine/models/dsv4_weights.py), FP4 experts as packed bytes
        (moe/expert_weights_dsv4.py)."""
        plan: WeightPlan = {"model.embed_tokens.weight": self.vocab.plan_entry(self.embed_tokens),
                            "head.weight": self.vocab.plan_entry(self.lm_head),
                            "model.norm.weight": PlanEntry(self.norm.weight, ()),
                            **self.hc_head.weight_plan("model.hc_head.")}
        for i, layer in enumerate(self.layers):
            plan.update(layer.weight_plan(i, self.spec, self.expert_ids, self.cfg.num_experts))
        names = frozenset(checkpoint_names or ())
        if names and "model.embed_tokens.weight" not in names:
            plan = {(published_name(n) if n not in names and published_name(n) in names else n): e
                    for n, e in plan.items()}
        if self.quant is not None:  # FP8 routed experts (a `.scale` beside a float destination): float at load
            plan = fp8_dequant_plan(plan, names, self.quant.block)
        return plan


def published_name(name: str) -> str:
    """The name DeepSeek's own V4 checkpoints give the tensor save_pretrained calls `name` (transformers'
    deepseek_v4 conversion mapping, read backwards): top level, embed / hc_head_* renamed, and attention's kv norm
    `attn.kv_norm.weight` (DeepSeek's files; transformers maps both it and `attn.norm.weight` to its kv_norm and saves
    the latter)."""
    special = {"model.embed_tokens.weight": "embed.weight", "model.hc_head.hc_fn": "hc_head_fn",
               "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale"}
    return special.get(name, name.removeprefix("model.").replace(".attn.norm.weight", ".attn.kv_norm.weight"))


__all__ = ["DeepseekV4ForCausalLM", "published_name"]
