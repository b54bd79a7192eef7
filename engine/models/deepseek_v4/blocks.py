"""DeepSeek-V4's block kinds (issue 45), registered for the one decoder (engine/models/moe_decoder.py):
embedding → hc_mult residual streams → layers → hyper-head → norm.

"hyper" (HyperLayer, the residual kind): the streams collapse (engine/models/hyper_connections.py) into the attention's input
(attn_norm first), the attention's output spreads back over the streams; the same around the FFN block (ffn_norm).
"dsv4" (the attention kind): attention.py; its verify steps roll its rings back (rollback.py). "token_routed" (the FFN
kind): routed experts (moe/token_routing.TokenRoutedMoELayer: by the token-id table on the hash layers, by
sqrt(softplus) scores with a correction bias on the rest; SwiGLU clamped at swiglu_limit) plus one shared expert,
clamped the same way. "hc_streams" / "hc_head": the ends of the streams. "published": the checkpoint's names as
DeepSeek publishes them or save_pretrained writes them; with DeepSeek's published formats, the attention's linears and
the shared expert are held FP8 (W8A8, weights.py), the routed experts FP4 (packed) or FP8 (dequantized at load).

Under tensor parallelism (`tp`, docs/tensor-parallelism.md) the attention splits its heads (attention.py), the
hyper-connections (per token, the same input on every rank after the attention's all-reduce) are whole on every rank,
the embedding and LM head are vocab-parallel (engine/tp/vocab.py), and the FFN block runs one of two ways
(engine/tp/experts.py, blocks/ffn.ffn_stages): with the experts in EP each rank takes its slice of the tokens (and of
their ids, which the hash-routed layers route by) into the router, the all-to-all and the shared expert, the slices
all-gathered; with expert_parallel_size 1 every rank holds every expert's 1/N of the intermediate channels (routed and
shared: w1 / w3 rows, w2 columns) and the block's partial output is all-reduced once.

Legend: T tokens, n streams, D hidden, I moe_intermediate_size, V vocab.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from moelink.kernels.compressed_attention import reference_rms_norm_f32
from moelink.kernels.moe import MoEActivation
from moelink.moe.expert_weights import make_expert_format
from moelink.moe.expert_weights_mxfp4_split import SplitMxfp4Experts
from moelink.moe.layer import ExpertParallel, Stages
from moelink.moe.router import make_router
from moelink.moe.stats import MoEStats
from moelink.moe.token_routers import HashRouter
from moelink.moe.token_routing import TokenRoutedMoELayer
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.architectures import ArchSpec
from ..compressed_attention_config import CompressedAttentionConfig
from .reader import DSV4Quantization, read_dsv4_quantization
from ...config.model import ModelConfig
from ...tp.experts import ExpertShard
from ...tp.group import TensorParallel
from ...tp.linear import ColumnParallel, RowParallel
from ..blocks.attention import ATTENTION, AttentionKind
from ..blocks.checkpoint import CHECKPOINT, CheckpointKind
from ..blocks.context import BuildContext
from ..blocks.ffn import FFN, FFNBlock, ffn_stages, overlapped
from ..blocks.stream import EMBEDDING, HEAD, RESIDUAL, Head, HyperConnectedLayer, Layer
from ..layers import ForwardContext, param
from ..linear import Linear, LinearMethod
from ..rope import rope_inv_freq
from .attention import DSV4Attention, RopeTable
from ..hyper_connections import HyperHead
from .rollback import StateRollback
from .weights import dsv4_linear_method, fp8_dequant_plan, published_linear_plan


class Norm(nn.Module):
    """V4's RMSNorm: float32 weight, computed in float32 (kernels/compressed_attention.reference_rms_norm_f32)."""

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
    dtype (FP8 ones dequantized at load: weights.py)."""
    return SplitMxfp4Experts() if quant is not None and quant.expert_dtype == "fp4" else make_expert_format(None, False)


def quantization(ctx: BuildContext) -> DSV4Quantization | None:
    """The model's V4 formats (config.json), read once per build; an MTP layer's build is handed them."""
    cfg = ctx.cfg
    return ctx.shared("dsv4_quant", lambda: read_dsv4_quantization(cfg.architecture, cfg.hf_config, cfg.quantization))


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


# -- attention: "compressed" ----------------------------------------------------------------------------------------
def _attention(ctx: BuildContext, i: int, attn: CompressedAttentionConfig,
               attention_cls: type = DSV4Attention) -> nn.Module:
    cfg = ctx.cfg
    if cfg.kv_cache_dtype not in (None, cfg.dtype, torch.float8_e4m3fn):  # fp8: e4m3 rows with scales only
        raise ValueError(f"kv_cache_dtype={cfg.kv_cache_dtype} is not supported for {cfg.architecture}: its fp8 "
                         "cache is float8_e4m3fn with scales (kv_cache_dtype='fp8') or the model dtype ('auto').")
    ropes = ctx.shared("dsv4_ropes", lambda: rope_tables(cfg, ctx.device))
    quant = quantization(ctx)
    return attention_cls(attn, i, cfg.hidden_size, ropes, ctx.kernels, cfg.dtype, ctx.device, quant, tp=ctx.tp)


class _Rollback:
    """A verify step's window and compressor rings: copied before the forward, the rejected drafts' slots restored
    after sampling (rollback.py)."""

    def __init__(self, mixers):
        self.rollback = StateRollback([m.num_paged for m in mixers])

    def before(self, ctx: ForwardContext, positions_T: torch.Tensor) -> None:
        self.rollback.snapshot(ctx, positions_T)

    def replay(self, num_accepted_S: torch.Tensor) -> None:
        self.rollback.restore(num_accepted_S)


ATTENTION.add("compressed", AttentionKind("attn", _attention, _Rollback))


# -- FFN: "token_routed" -----------------------------------------------------------------------------------------
@FFN.register("token_routed")
class TokenRoutedFFN(FFNBlock):
    """Routed experts (a learned router, or the token-id table on the hash layers) + the clamped shared expert,
    the shared one computed while the EP dispatch is in flight."""

    def __init__(self, ctx: BuildContext, i: int):
        cfg, tp, m, D = ctx.cfg, ctx.tp, ctx.cfg.moe, ctx.cfg.hidden_size
        quant = quantization(ctx)
        router = (HashRouter(cfg.top_k, m.router.routed_scaling_factor) if i in cfg.hash_layers
                  else make_router(m.router))
        # Under TP without EP every rank holds every expert's 1/N of the channels (engine/tp/experts.py); with EP the
        # experts are placed whole and the block runs on the rank's token slice.
        self.expert_shard = ExpertShard(tp, cfg.moe_intermediate_size) if tp and ctx.ep is None else None
        inter = self.expert_shard.w if self.expert_shard else cfg.moe_intermediate_size
        self.moe = TokenRoutedMoELayer(D, inter, cfg.num_experts, router, ctx.kernels, cfg.dtype, ctx.device,
                                       ep=ctx.ep, moe_index=ctx.moe_row(i), stats=ctx.stats,
                                       expert_format=expert_format(quant),
                                       activation=MoEActivation("silu_clamp", limit=m.swiglu_limit),
                                       vocab_size=cfg.vocab_size)
        self.shared = ClampedMLP(D, cfg.moe_intermediate_size, m.swiglu_limit, dsv4_linear_method(quant), ctx.kernels,
                                 cfg.dtype, ctx.device, shard=self.expert_shard, tp=tp)
        self.modules = {"moe": self.moe, "shared": self.shared}

    def stages(self, h_TD: torch.Tensor, input_ids_T: torch.Tensor | None) -> Stages:
        return overlapped(self.moe.stages(h_TD, input_ids_T), lambda: self.shared(h_TD))

    def sliced(self, input_ids_T: torch.Tensor | None, tp: TensorParallel) -> Any:
        return _WithIds(self, input_ids_T, tp)

    def moe_only_stages(self, x_0D: torch.Tensor) -> Stages:
        return (yield from self.moe.stages(x_0D, torch.zeros(0, dtype=torch.long, device=x_0D.device)))

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        f = f"{p}{spec.moe_prefix}."
        plan: WeightPlan = {f + "gate.weight": PlanEntry(self.moe.gate_GD, ())}
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
    """The FFN block as engine/tp/experts.token_sliced_stages runs it (`stages(h_tD)` on the rank's token slice),
    with the slice's token ids beside it (the hash-routed layers route by them)."""

    def __init__(self, block: TokenRoutedFFN, input_ids_T: torch.Tensor | None, tp: TensorParallel):
        self.block, self.input_ids_T, self.tp = block, input_ids_T, tp

    def stages(self, h_tD: torch.Tensor) -> Stages:
        assert self.input_ids_T is not None  # hash routing needs the ids
        lo, hi = self.tp.token_rows(self.input_ids_T.shape[0])  # the slice token_sliced_stages cut
        return self.block.stages(h_tD, self.input_ids_T[lo:hi])


# -- residual: "hyper" -------------------------------------------------------------------------------------------
@RESIDUAL.register("hyper")
class HyperLayer(HyperConnectedLayer):
    """Hyper-connections around the attention and the FFN block (blocks/stream.HyperConnectedLayer's flow), behind
    DeepSeek-V4's own norms (attn_norm, ffn_norm): the stream is x_TnD, hc_mult streams."""

    def __init__(self, ctx: BuildContext, i: int, attention: AttentionKind, attn_cfg: Any,
                 ffn: Callable[[BuildContext, int], FFNBlock]):
        super().__init__(ctx)
        self._hyper_connections(ctx)
        D, eps = ctx.cfg.hidden_size, ctx.cfg.rms_norm_eps
        self.attn_norm, self.ffn_norm = Norm(D, eps, ctx.device), Norm(D, eps, ctx.device)
        self.install(ctx, i, attention, attn_cfg, ffn)

    def norms(self):
        return self.attn_norm, self.ffn_norm

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        """The FP8 linears' entries (float8_e4m3fn weights, `.scale` into float32) are ones `fp8_dequant_plan`
        leaves as they are."""
        plan: WeightPlan = {**self.attn_hc.weight_plan(p + "hc_attn"), **self.ffn_hc.weight_plan(p + "hc_ffn"),
                            p + "attn_norm.weight": PlanEntry(self.attn_norm.weight, ()),
                            p + "ffn_norm.weight": PlanEntry(self.ffn_norm.weight, ())}
        plan.update(self.mixer.weight_plan(p + "attn."))
        plan.update(self.ffn.weight_plan(p, layer_idx, cfg, spec, expert_ids, names))
        return plan


def mtp_layer(cfg: ModelConfig, spec: ArchSpec, i: int, ropes: dict, kernels, device, ep: ExpertParallel | None,
              stats: MoEStats, quant: DSV4Quantization | None, attention: CompressedAttentionConfig, moe_index: int,
              attention_cls: type, tp: TensorParallel | None = None) -> HyperLayer:
    """An MTP block (mtp.py): a main layer's kinds at index i past the main layers, with its
    own attention config and class (a paged window: the drafter's cache), rope tables, formats and MoEStats row."""
    ctx = BuildContext(cfg, spec, kernels, device, ep, stats, tp if tp is not None and tp.size > 1 else None,
                       moe_index=moe_index, cache={"dsv4_ropes": ropes, "dsv4_quant": quant})
    kind = AttentionKind("attn", lambda c, j, a: _attention(c, j, a, attention_cls))
    return HyperLayer(ctx, i, kind, attention, FFN.get(spec.ffn))


# -- ends: "hc_streams", "hc_head" -------------------------------------------------------------------------------
EMBEDDING.add("hc_streams", lambda cfg, x_TD: x_TD.unsqueeze(1).expand(-1, cfg.hyper_connections.hc_mult, -1)
              .contiguous())


@HEAD.register("hc_head")
class HyperHeadBlock(Head):
    """The streams' last collapse (HyperHead), then the float32 norm; the LM head is `head.weight`, never tied."""

    lm_head_name = "head.weight"
    tieable = False

    def __init__(self, ctx: BuildContext):
        cfg = ctx.cfg
        assert cfg.hyper_connections is not None  # HyperLayer refused the model first
        self.hc_head = HyperHead(cfg.hyper_connections, cfg.hidden_size, cfg.rms_norm_eps, ctx.device)
        self.norm = Norm(cfg.hidden_size, cfg.rms_norm_eps, ctx.device)
        self.modules = {"hc_head": self.hc_head, "norm": self.norm}

    def finish(self, state: Any) -> torch.Tensor:
        return self.norm(self.hc_head(state))

    def weight_plan(self) -> WeightPlan:
        return {"model.norm.weight": PlanEntry(self.norm.weight, ()), **self.hc_head.weight_plan("model.hc_head.")}


# -- checkpoint: "published" -------------------------------------------------------------------------------------
def _published_plan(cfg: ModelConfig, spec: ArchSpec, plan: WeightPlan, names: frozenset[str]) -> WeightPlan:
    """The checkpoint's names as save_pretrained writes them (the published layer names under `model.`), or as
    DeepSeek publishes them (no `model.` prefix, `embed.weight`, `hc_head_fn`: `published_name`) where the
    checkpoint holds those; with V4's published formats, the FP8 linears held FP8 with their `.scale`, FP8 routed
    experts dequantized (weights.py), FP4 experts as packed bytes (moe/expert_weights_mxfp4_split.py)."""
    if names and "model.embed_tokens.weight" not in names:
        plan = {(published_name(n) if n not in names and published_name(n) in names else n): e
                for n, e in plan.items()}
    quant = read_dsv4_quantization(cfg.architecture, cfg.hf_config, cfg.quantization)
    if quant is not None:  # FP8 routed experts (a `.scale` beside a float destination): float at load
        plan = fp8_dequant_plan(plan, names, quant.block)
    return plan


def published_name(name: str) -> str:
    """The name DeepSeek's own V4 checkpoints give the tensor save_pretrained calls `name` (transformers'
    deepseek_v4 conversion mapping, read backwards): top level, embed / hc_head_* renamed, and attention's kv norm
    `attn.kv_norm.weight` (DeepSeek's files; transformers maps both it and `attn.norm.weight` to its kv_norm and saves
    the latter)."""
    special = {"model.embed_tokens.weight": "embed.weight", "model.hc_head.hc_fn": "hc_head_fn",
               "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale"}
    return special.get(name, name.removeprefix("model.").replace(".attn.norm.weight", ".attn.kv_norm.weight"))


# Nothing converts after loading: the FP8 linears run FP8, the FP8 experts were dequantized as they loaded.
CHECKPOINT.add("published", CheckpointKind(_published_plan, lambda cfg, model, updated=None: None))

__all__ = ["ClampedMLP", "HyperLayer", "Norm", "TokenRoutedFFN", "mtp_layer", "published_name", "rope_tables"]
