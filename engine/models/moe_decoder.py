"""The decoder, one definition for every architecture: a layer is attention kind x MLP kind.

Legend: T tokens in the flat batch, D hidden, V vocab.

Layer structure (pre-norm, as in every supported family):
    h = x + attn(norm1(x));  out = h + mlp(norm2(h))
with the residual add fused into the next norm. Attention kinds (ModelConfig.attention): GQA (gqa.py) or
MLA (mla.py); a layer runs its own config of the kind, `ModelConfig.attention_for(layer)` (MiMo-V2-Flash's full
and sliding layers differ in kv heads, sinks and rope), with one rotary table per distinct rope. MLP kinds, per layer: dense (the layers outside `sparse_layers`: Qwen3's mlp_only_layers,
DeepSeek / GLM's first_k_dense_replace), routed experts (moe.MoELayer), or routed + shared experts
(SharedExpertsMoE, when n_shared_experts > 0). The ArchSpec of an architecture names its attention kind and
its checkpoint's weight names; ModelConfig holds every shape and routing fact.
"""
from __future__ import annotations

from typing import Collection

import torch
from torch import nn

from moelink.kernels.moe import MoEActivation
from moelink.moe.expert_weights import gate_up_order, make_expert_format
from moelink.moe.layer import ExpertParallel, MoELayer, MoEOnlyStages, Stages, run_stages
from moelink.moe.router import make_router
from moelink.moe.stats import MoEStats
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ..config.architectures import ArchSpec
from ..config.model import ModelConfig
from ..tp.experts import ExpertShard, token_sliced_stages
from ..tp.group import TensorParallel
from ..tp.vocab import VocabShard
from .gated_deltanet import GatedDeltaNet
from .gqa import GQAAttention
from .layers import DenseMLP, ForwardContext, RMSNorm
from .mla import MLAAttention
from .rope import RotaryEmbedding


class SharedExpertsMoE(nn.Module):
    """Routed experts plus always-on shared experts (DeepSeek, GLM): out = routed(x) + shared(x), as
    transformers adds them. The shared MLP runs on this rank's own tokens, so under expert parallelism every
    rank holds it and it never crosses the all-to-all; only routed experts are placed, dispatched, counted."""

    def __init__(self, routed: MoELayer, shared: DenseMLP, gate_D: torch.Tensor | None = None):
        """gate_D: Qwen3-Next's shared_expert_gate ([D]): the shared MLP's output is scaled by sigmoid(x . gate)
        per token before the sum; None: added as it is."""
        super().__init__()
        self.routed, self.shared = routed, shared
        self.gate_D = gate_D

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages(x_TD))

    def stages(self, x_TD: torch.Tensor) -> Stages:
        """The routed layer's stages with the shared MLP run while the dispatch is in flight (its one
        independent piece of work); the sum is routed + shared, as before."""
        routed = self.routed.stages(x_TD)
        try:
            next(routed)  # router run, dispatch issued
        except StopIteration as done:  # no expert parallelism: nothing travels
            return done.value + self._shared(x_TD)
        shared_TD = self._shared(x_TD)
        yield  # dispatch in flight (the shared MLP above ran during it)
        routed_TD = yield from routed
        return routed_TD + shared_TD

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        shared_TD = self.shared(x_TD)
        if self.gate_D is not None:
            shared_TD = torch.sigmoid(x_TD @ self.gate_D)[:, None] * shared_TD
        return shared_TD


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding, kernels, device,
                 ep: ExpertParallel | None, stats: MoEStats, spec: ArchSpec | None = None, fused_experts: bool = False,
                 tp: TensorParallel | None = None):
        """fused_experts: the checkpoint holds this layer's experts fused (experts.gate_up_proj), which decides
        how FP8 experts lay out their gate and up blocks (moe/expert_weights.Fp8BlockExperts). tp: the rank's
        TensorParallel (engine/tp/group.py; None: no TP): attention and the dense MLP split over it, and the
        MoE block takes only this rank's slice of the tokens (`stages`)."""
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 else None
        dt, quant = cfg.dtype, cfg.quantization
        p = f"model.layers.{layer_idx}."
        moe_prefix, shared_name = (spec.moe_prefix, spec.shared_experts) if spec else ("mlp", "shared_experts")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dt, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dt, device)
        attn = cfg.attention_for(layer_idx)  # this layer's own config where the layers differ (MiMo-V2-Flash)
        # The token mixer, under its checkpoint name: self_attn (attention over the paged KV cache) or linear_attn
        # (gated DeltaNet over per-sequence state: Qwen3-Next's three layers in four).
        self.mixer_name = "linear_attn" if attn.kind == "linear" else "self_attn"
        if attn.kind == "linear":
            self.linear_attn = GatedDeltaNet(layer_idx, cfg.hidden_size, attn, cfg.rms_norm_eps, kernels, dt, device,
                                             tp=self.tp)
        elif attn.kind == "mla":
            self.self_attn = MLAAttention(layer_idx, cfg.hidden_size, attn, rope, kernels, dt, device, quant,
                                          cfg.max_model_len, tp=self.tp)
        else:
            self.self_attn = GQAAttention(layer_idx, cfg.hidden_size, attn, cfg.rms_norm_eps, rope, kernels, dt,
                                          device, quant, sinks_name=spec.sinks if spec else "sinks", tp=self.tp)
        self.is_sparse = layer_idx in cfg.sparse_layers
        self.expert_shard = None
        # The routed experts of this layer (None in a dense layer): EP, valid rows and the counters act on them.
        self.moe: MoELayer | None = None
        if self.is_sparse:
            experts = f"{p}{moe_prefix}.experts"
            fmt = make_expert_format(quant if quant is None or quant.is_quantized(experts) else None, fused_experts)
            m = cfg.moe
            # Under TP without EP (ep None) each rank holds every expert's 1/N of the intermediate channels
            # (engine/tp/experts.py); with EP the experts are placed whole and the block runs on token slices.
            self.expert_shard = ExpertShard(self.tp, cfg.moe_intermediate_size) if self.tp and ep is None else None
            inter = self.expert_shard.w if self.expert_shard else cfg.moe_intermediate_size
            self.moe = MoELayer(cfg.hidden_size, inter, cfg.num_experts, make_router(m.router),
                                kernels, dt, device, ep=ep, moe_index=cfg.sparse_layers.index(layer_idx), stats=stats,
                                expert_format=fmt, router_bias=m.router_bias, expert_bias=m.expert_bias,
                                activation=MoEActivation(m.activation, m.swiglu_alpha, m.swiglu_limit))
            n_shared = cfg.moe.n_shared_experts
            shared_size = m.shared_expert_intermediate_size or cfg.moe_intermediate_size * n_shared
            gate = (nn.Parameter(torch.empty(cfg.hidden_size, dtype=dt, device=device), requires_grad=False)
                    if m.shared_expert_gate else None)
            if self.expert_shard and self.moe.b2_ED is not None:
                self.moe.b2_ED.zero_()  # gpt-oss's down bias: the group's first rank loads it, the others add none
            # Shared experts split like the routed ones (their partial sum all-reduced with the routed one's).
            split = dict(tp=self.tp, reduce=False) if self.expert_shard else {}
            self.mlp = (self.moe if not n_shared else SharedExpertsMoE(self.moe, DenseMLP(
                cfg.hidden_size, shared_size, dt, device, kernels=kernels, quant=quant,
                prefix=f"{p}{moe_prefix}.{shared_name}.", **split), gate))
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, dt, device, kernels=kernels, quant=quant,
                                prefix=p + "mlp.", tp=self.tp)

    def forward(self, positions_T, x_TD, residual_TD, ctx: ForwardContext):
        return run_stages(self.stages(positions_T, x_TD, residual_TD, ctx))

    def stages(self, positions_T, x_TD, residual_TD, ctx: ForwardContext):
        """The layer as stages (moe.layer.MoELayer.stages): yields while its MoE all-to-all is in flight, returns
        (mlp output, residual). A dense layer never yields."""
        if residual_TD is None:
            residual_TD, h_TD = x_TD, self.input_layernorm(x_TD)
        else:
            h_TD, residual_TD = self.input_layernorm.add_forward(x_TD, residual_TD)
        h_TD = getattr(self, self.mixer_name)(positions_T, h_TD, ctx)
        h_TD, residual_TD = self.post_attention_layernorm.add_forward(h_TD, residual_TD)
        if self.moe is None:
            return self.mlp(h_TD), residual_TD
        if self.tp is None:
            return (yield from self.mlp.stages(h_TD)), residual_TD
        if self.expert_shard is not None:  # every token, this rank's channels of every expert: one all-reduce
            return self.tp.all_reduce((yield from self.mlp.stages(h_TD))), residual_TD
        return (yield from token_sliced_stages(self.tp, self.moe, self.mlp, h_TD)), residual_TD

class MoEDecoderForCausalLM(nn.Module):
    """Embedding → decoder layers → final norm; `compute_logits` applies the LM head to chosen rows."""

    def __init__(self, cfg: ModelConfig, spec: ArchSpec, kernels, device: torch.device,
                 ep: ExpertParallel | None = None, checkpoint_names: Collection[str] | None = None, tp: TensorParallel | None = None):
        """checkpoint_names: the tensors the checkpoint holds (None = per-expert layout), read for the experts'
        on-disk layout per layer, as `weight_plan` reads it. tp: the rank's TensorParallel (None: no TP): the
        layers split over it, and the embedding and LM head are vocab-parallel (engine/tp/vocab.py)."""
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 else None
        if spec.attention != cfg.attention.kind:  # ModelConfig checks that every layer's is the model's kind
            raise ValueError(f"architecture {cfg.architecture} runs {spec.attention} attention, but its ModelConfig "
                             f"holds {cfg.attention.kind}.")
        self.cfg, self.spec = cfg, spec
        # Logical ids of the experts this rank holds, in local slot order (all of them without EP).
        self.expert_ids = list(range(cfg.num_experts)) if ep is None else list(ep.local_experts)
        self.moe_stats = MoEStats(len(cfg.sparse_layers), cfg.num_experts, device)
        dt = cfg.dtype
        # Vocab rows this rank holds: all, or its ceil(V / N) shard under TP (rows past V stay zero).
        self.vocab = VocabShard(cfg.vocab_size, self.tp)
        rows = self.vocab.rows
        self.embed_tokens = nn.Parameter(torch.zeros(rows, cfg.hidden_size, dtype=dt, device=device), requires_grad=False)
        # One table per distinct rope (the layers that share one hold the same module): one for most models, one
        # per layer kind where the kinds rotate differently (MiMo-V2-Flash's full and sliding layers).
        ropes: dict = {}

        def rope_of(i: int) -> RotaryEmbedding | None:
            r = getattr(cfg.attention_for(i), "rope", None)  # linear attention has none
            if r is None:
                return None
            if r not in ropes:
                ropes[r] = RotaryEmbedding(r, cfg.hf_config, cfg.max_model_len, kernels, device)
            return ropes[r]

        names = frozenset(checkpoint_names) if checkpoint_names is not None else frozenset()
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, rope_of(i), kernels, device, ep, self.moe_stats, spec,
                         fused_experts=fused_experts_name(i) in names, tp=self.tp) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dt, device)
        self.lm_head = (
            self.embed_tokens if cfg.tie_word_embeddings
            else nn.Parameter(torch.zeros(rows, cfg.hidden_size, dtype=dt, device=device), requires_grad=False)
        )

    def forward(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Returns the final-normed hidden states [T, D]."""
        return run_stages(self.stages(input_ids_T, positions_T, ctx))

    def stages(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext) -> Stages:
        """`forward` as stages: yields twice per MoE layer under expert parallelism (dispatch in flight, combine
        in flight), never otherwise; returns the final-normed hidden states [T, D]. engine/rank/step_plan.py drives
        it, alone or interleaved with another micro-batch's. With `ctx.aux` it also keeps the residual stream
        after the layers the capture names (an EAGLE-3 drafter's states: one add each, no sync)."""
        x_TD = self.vocab.embed(input_ids_T, self.embed_tokens)
        residual_TD = None
        aux = ctx.aux  # an EAGLE-3 drafter's capture (models/layers.AuxCapture); None: the normal path, untouched
        for i, layer in enumerate(self.layers):
            if aux is not None:
                aux.take(i, x_TD, residual_TD)
            x_TD, residual_TD = yield from layer.stages(positions_T, x_TD, residual_TD, ctx)
        if aux is not None:
            aux.take(len(self.layers), x_TD, residual_TD)
        h_TD, _ = self.norm.add_forward(x_TD, residual_TD)
        return h_TD

    def set_valid_rows(self, valid_T: torch.Tensor | None) -> None:
        """Mark which rows of the coming forward are real (bool [T]); the MoE layers route the others to
        no expert. None (the default) = every row is real. Used by padded decode graphs."""
        if valid_T is not None and any(layer.moe is not None and layer.moe.ep is not None
                                       and not layer.moe.ep.all_to_all.accepts_padding_rows for layer in self.layers):
            # The counted backends look every id up in the placement tables; -1 has no rank to go to.
            raise ValueError("set_valid_rows is invalid under expert parallelism with this all-to-all: padded rows "
                             "dispatch only on the fixed-capacity backends (torch_padded, nccl).")
        for layer in self.layers:
            if layer.moe is not None:
                layer.moe.valid_rows_T = valid_T

    def forward_moe_only(self) -> None:
        """An empty step under expert parallelism: no local tokens, but this rank still
        joins every MoE layer's dispatch and combine, in the same order as its peers (shared experts, which
        are local, have nothing to do)."""
        run_stages(self.moe_only_stages())

    def moe_only_stages(self) -> MoEOnlyStages:
        """`forward_moe_only` as stages: the same yields as `stages` (an empty micro-batch of a two-batch step
        runs this, so its rank issues the same collectives as its peers); returns None."""
        x_0D = self.embed_tokens.new_zeros(0, self.cfg.hidden_size)
        for layer in self.layers:
            if layer.moe is not None:
                yield from layer.moe.stages(x_0D)

    def process_weights_after_loading(self) -> None:
        """After the loader filled every parameter: modules that convert what they loaded (an FP8 kv_b_proj
        dequantized for MLA's absorption) do it now; zero-centred norms (ModelConfig.norm_weight_offset) become
        plain ones."""
        if self.cfg.norm_weight_offset:
            for module in self.modules():
                if isinstance(module, RMSNorm):
                    module.weight.add_(self.cfg.norm_weight_offset)
        for module in self.modules():
            if module is not self and hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()

    def replay_states(self, num_accepted_S: torch.Tensor) -> None:
        """A verify step of a model with linear-attention layers: each layer's verifying sequences take their
        accepted tokens into their states (engine/state/step.VerifySplit)."""
        for layer in self.layers:
            if layer.mixer_name == "linear_attn":
                layer.linear_attn.replay_states(num_accepted_S)

    def compute_logits(self, h_SD: torch.Tensor) -> torch.Tensor:
        """[S, V] on every rank (under TP each rank's vocab shard, all-gathered: every rank samples the same)."""
        return self.vocab.logits(h_SD, self.lm_head)

    # -- checkpoint mapping ---------------------------------------------------
    def weight_plan(self, checkpoint_names: Collection[str] | None = None) -> WeightPlan:
        """Checkpoint tensor name → (destination parameter, index into it[, index into the tensor]).

        Only tensors this rank needs are listed, so a loader that follows the
        plan never reads another rank's experts (in the fused layout it skips
        their rows when this rank's experts are contiguous). Experts come in one of two on-disk layouts, chosen per
        layer from `checkpoint_names` (None = per-expert):
        - per expert, as Hugging Face publishes them and `save_pretrained` writes
          them by default: `{moe_prefix}.experts.{e}.{expert_names}.weight`;
        - fused, as transformers 5 holds them in memory and writes them with
          `save_pretrained(save_original_format=False)`: `mlp.experts.gate_up_proj`
          [E, 2I, D] (gate rows, then up rows: our w13 order) and
          `mlp.experts.down_proj` [E, D, I], with the router at `mlp.gate`.
        """
        cfg = self.cfg
        names = frozenset(checkpoint_names) if checkpoint_names is not None else frozenset()
        plan: WeightPlan = {"model.embed_tokens.weight": self.vocab.plan_entry(self.embed_tokens)}
        if not cfg.tie_word_embeddings:
            plan["lm_head.weight"] = self.vocab.plan_entry(self.lm_head)
        plan.update(self.norm.weight_plan("model.norm.weight"))
        for i, layer in enumerate(self.layers):
            plan.update(layer_weight_plan(layer, i, cfg, self.spec, self.expert_ids, names))
        return aliased(plan, self.spec, names)


def layer_weight_plan(layer: DecoderLayer, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                      names: frozenset[str]) -> WeightPlan:
    """The plan of one decoder layer, whose checkpoint names start with `model.layers.{layer_idx}.`: norms,
    attention, and its dense MLP or its router, this rank's experts (`expert_ids`, in the layer's layout per
    `names`: MoEDecoderForCausalLM.weight_plan) and shared experts. Also the MTP layer's inner layer (mtp.py)."""
    p = f"model.layers.{layer_idx}."
    plan: WeightPlan = {}
    plan.update(layer.input_layernorm.weight_plan(p + "input_layernorm.weight"))
    plan.update(layer.post_attention_layernorm.weight_plan(p + "post_attention_layernorm.weight"))
    plan.update(getattr(layer, layer.mixer_name).weight_plan(f"{p}{layer.mixer_name}."))
    if layer.moe is None:
        plan.update(layer.mlp.weight_plan(p + "mlp."))
        return plan
    shard = getattr(layer, "expert_shard", None)  # experts split by TP (engine/tp/experts.py)
    if spec.expert_layout == "gpt_oss":
        plan.update(_gpt_oss_plan(layer.moe, f"{p}{spec.moe_prefix}.", cfg, spec, expert_ids))
        if shard is not None:
            plan.update(shard.gpt_oss_plan(layer.moe, f"{p}{spec.moe_prefix}.", cfg.hidden_size))
            if shard.rank:  # the down bias once per group (the others' stay zero)
                plan.pop(f"{p}{spec.moe_prefix}.experts.down_proj_bias")
        return plan
    fused = fused_experts_name(layer_idx) in names
    prefix = p + ("mlp." if fused else spec.moe_prefix + ".")
    plan.update(_expert_plan(layer.moe, prefix, fused, cfg, spec, expert_ids))
    if shard is not None:  # the same names, this rank's channels
        plan.update(shard.plan(layer.moe, prefix, fused, expert_ids, spec.expert_names))
    if isinstance(layer.mlp, SharedExpertsMoE):  # every rank holds the shared experts whole
        plan.update(layer.mlp.shared.weight_plan(f"{p}{spec.moe_prefix}.{spec.shared_experts}."))
        if layer.mlp.gate_D is not None:  # [1, D] on disk
            plan[f"{p}{spec.moe_prefix}.{spec.shared_experts}_gate.weight"] = PlanEntry(layer.mlp.gate_D, (), (0,))
    return plan


def _expert_plan(mlp: MoELayer, m: str, fused: bool, cfg: ModelConfig, spec: ArchSpec,
                 expert_ids: list[int]) -> WeightPlan:
    """The router and this rank's experts of one MoE layer whose checkpoint names start with `m`."""
    plan: WeightPlan = {m + "gate.weight": PlanEntry(mlp.gate_GD, ())}
    if mlp.e_score_correction_bias_G is not None:
        plan[m + spec.correction_bias] = PlanEntry(mlp.e_score_correction_bias_G, ())
    # The expert format lists its weights (and scales) for this rank's experts, in either layout.
    rows = _expert_rows(expert_ids, cfg.num_experts) if fused else ()
    plan.update(mlp.expert_format.weight_plan(mlp, m, fused, expert_ids, rows, spec.expert_names))
    return plan


def _gpt_oss_plan(mlp: MoELayer, m: str, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int]) -> WeightPlan:
    """gpt-oss's MoE block: `router.weight` / `router.bias`, and the experts fused, with their biases:
    `experts.gate_up_proj` [E, D, 2I] (x @ W, not a linear's [out, in]) whose columns interleave gate and
    up (gate = [..., ::2], up = [..., 1::2]), `gate_up_proj_bias` [E, 2I] interleaved the same way,
    `down_proj` [E, I, D] and `down_proj_bias` [E, D].

    Read as moelink's layout by one advanced index each (the loader's checkpoint-index element): with
    e [E', 1, 1] this rank's experts, f [1, 2I, 1] the de-interleaving column order [0, 2, ..., 1, 3, ...]
    and d [1, 1, D], gate_up_proj[e, d, f] is w13 [E', 2I, D] = [gate; up] rows, transposed; down_proj[e,
    i, d] with i [1, 1, I], d [1, D, 1] is w2 [E', D, I].

    Quantized experts (MXFP4, as OpenAI publishes gpt-oss: `experts.*_blocks` / `*_scales`, already output-
    channel major) are their format's plan, the same de-interleaving included (moe/expert_weights.py)."""
    plan: WeightPlan = {m + f"{spec.router}.weight": PlanEntry(mlp.gate_GD, ()),
                        m + f"{spec.router}.bias": PlanEntry(mlp.gate_bias_G, ())}
    if mlp.expert_format.name != "float":
        rows = _expert_rows(expert_ids, cfg.num_experts)
        plan.update(mlp.expert_format.weight_plan(mlp, m, True, expert_ids, rows, spec.expert_names))
        return plan
    D, inter = cfg.hidden_size, cfg.moe_intermediate_size
    e = torch.tensor(expert_ids, dtype=torch.long)
    f = gate_up_order(inter)
    plan[m + "experts.gate_up_proj"] = PlanEntry(mlp.w13_EFD, (), (e[:, None, None], torch.arange(D)[None, None, :],
                                                                   f[None, :, None]))
    plan[m + "experts.gate_up_proj_bias"] = PlanEntry(mlp.b13_EF, (), (e[:, None], f[None, :]))
    plan[m + "experts.down_proj"] = PlanEntry(mlp.w2_EDI, (), (e[:, None, None], torch.arange(inter)[None, None, :],
                                                               torch.arange(D)[None, :, None]))
    plan[m + "experts.down_proj_bias"] = PlanEntry(mlp.b2_ED, (), (e,))
    return plan


def aliased(plan: WeightPlan, spec: ArchSpec, names: frozenset[str]) -> WeightPlan:
    """`plan` with each entry the checkpoint holds under its transformers 5 name only (ArchSpec.weight_aliases:
    MiMo-V2-Flash's `attention_sink_bias` saved as `sinks`) read under that name."""
    if not spec.weight_aliases or not names:
        return plan
    out: WeightPlan = {}
    for name, entry in plan.items():
        for published, alias in spec.weight_aliases:
            if name not in names and name.endswith(published) and name[: -len(published)] + alias in names:
                name = name[: -len(published)] + alias
        out[name] = entry
    return out


def fused_experts_name(layer_idx: int) -> str:
    """The checkpoint tensor whose presence says layer `layer_idx` holds its experts fused."""
    return f"model.layers.{layer_idx}.mlp.experts.gate_up_proj"


def _expert_rows(expert_ids: list[int], num_experts: int) -> tuple:
    """Index into a fused [E, ...] checkpoint tensor that yields this rank's experts in local slot order:
    () for all of them, a slice for a contiguous run (read without the other rows), else the id list."""
    if expert_ids == list(range(num_experts)):
        return ()
    lo = expert_ids[0] if expert_ids else 0
    if expert_ids == list(range(lo, lo + len(expert_ids))):
        return (slice(lo, lo + len(expert_ids)),)
    return (torch.tensor(expert_ids, dtype=torch.long),)
