"""Granite-MoE's block kinds (engine/models/blocks/registry.py imports this module): the FFN kind "granite_moe"
(routed experts, with the shared MLP where the config has one, read from Granite's fused names) and the checkpoint
kind "granite_mup" (the muP multipliers folded into the weights once they are loaded).

Why folding: every multiplier is a constant factor on a linear path, so it moves into a weight exactly up to one
rounding, and the decoder's blocks stay the shared ones. embedding_multiplier scales the embedding table;
residual_multiplier scales o_proj (and its bias; a Mamba2 layer's out_proj), the experts' down projections and the shared MLP's; logits_scaling
(and, where the LM head is the embedding table, embedding_multiplier again) divides the final norm's weight.
attention_multiplier is GQAConfig.scale, not folded."""
from __future__ import annotations

import torch
from torch import nn

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.checkpoint import CHECKPOINT, CheckpointKind, aliased, converted
from ..blocks.context import BuildContext
from ..blocks.ffn import FFN, FFNBlock, RoutedFFN, RoutedSharedFFN, fused_experts_name

# (published name, transformers 5's name) of each fused tensor under `block_sparse_moe.`; the engine's fused plan
# names them as transformers 5 holds them under `mlp.` (blocks/ffn._expert_plan).
_EXPERT_NAMES = {"experts.gate_up_proj": ("input_linear.weight", "experts.gate_up_proj"),
                 "experts.down_proj": ("output_linear.weight", "experts.down_proj"),
                 "router.weight": ("router.layer.weight", "router.weight")}


def _granite_plan(block: RoutedFFN, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                  names: frozenset[str], plan_of) -> WeightPlan:
    """The block's plan with its experts read fused (Granite publishes no per-expert layout) under the names the
    checkpoint holds: the published ones unless it holds transformers 5's (and with no names, the published)."""
    plan = plan_of(p, layer_idx, cfg, spec, expert_ids, names | {fused_experts_name(layer_idx)})
    out: WeightPlan = {}
    moe = f"{p}{spec.moe_prefix}."
    for name, entry in plan.items():
        rest = name[len(p + "mlp."):] if name.startswith(p + "mlp.") else None
        if rest in _EXPERT_NAMES:
            published, own = _EXPERT_NAMES[rest]
            name = moe + (own if moe + own in names else published)
        out[name] = entry
    return out


class _GraniteRouted(RoutedFFN):
    def weight_plan(self, p, layer_idx, cfg, spec, expert_ids, names):
        return _granite_plan(self, p, layer_idx, cfg, spec, expert_ids, names, super().weight_plan)


class _GraniteShared(RoutedSharedFFN):
    """The shared MLP sits beside block_sparse_moe (shared_mlp.), its gate and up rows one input_linear [2S, D]
    (gate rows, then up rows: the stacked weight's own order), read as one tensor into both pieces."""

    def weight_plan(self, p, layer_idx, cfg, spec, expert_ids, names):
        plan = _granite_plan(self, p, layer_idx, cfg, spec, expert_ids, names, super().weight_plan)
        mlp = f"{p}{spec.moe_prefix}.{spec.shared_experts}."
        gate, up = plan.pop(mlp + "gate_proj.weight"), plan.pop(mlp + "up_proj.weight")
        S = cfg.moe.shared_expert_intermediate_size
        if gate.dest is not up.dest or not isinstance(gate.dest, nn.Parameter):
            raise ValueError(f"{cfg.architecture}: the shared MLP's gate and up weights are not one float stack.")
        plan[f"{p}shared_mlp.input_linear.weight"] = PlanEntry(gate.dest, _joined(gate.index, up.index),
                                                               (torch.cat([_rows(gate.source, S),
                                                                           S + _rows(up.source, S)]),))
        plan[f"{p}shared_mlp.output_linear.weight"] = plan.pop(mlp + "down_proj.weight")
        return plan


def _rows(source: tuple, width: int) -> torch.Tensor:
    """The checkpoint rows a piece's source reads, as a row list (a TP rank's slice, or all `width`)."""
    if not source:
        return torch.arange(width)
    s = source[0]
    return s if isinstance(s, torch.Tensor) else torch.arange(width)[s]


def _joined(a: tuple, b: tuple) -> tuple:
    """One index covering the two adjacent pieces of the stacked weight (gate rows, then up rows)."""
    if not (len(a) == len(b) == 1 and isinstance(a[0], slice) and isinstance(b[0], slice) and a[0].stop == b[0].start):
        raise ValueError("the shared MLP's gate and up pieces are not adjacent rows of one weight.")
    return (slice(a[0].start, b[0].stop),)


@FFN.register("granite_moe")
def _granite_ffn(ctx: BuildContext, i: int) -> FFNBlock:
    return (_GraniteShared if ctx.cfg.moe.n_shared_experts else _GraniteRouted)(ctx, i)


def _factors(cfg: ModelConfig, model: nn.Module) -> list[tuple[torch.Tensor, float]]:
    """(tensor, the factor it is multiplied by) for every weight a multiplier folds into."""
    hf = cfg.hf_config
    emb, res, logits = (float(hf.get(k, 1.0)) for k in ("embedding_multiplier", "residual_multiplier",
                                                         "logits_scaling"))
    tied = model.lm_head is model.embed_tokens
    out = [(model.embed_tokens, emb), (model.norm.weight, 1.0 / (logits * (emb if tied else 1.0)))]
    for layer in model.layers:
        mixer = layer.mixer  # GQA's self_attn, or Granite 4.0-H's Mamba2 (mamba: its out_proj, no bias)
        if hasattr(mixer, "o_proj"):
            out.append((mixer.o_proj.weight, res))
            if mixer.o_bias is not None:
                out.append((mixer.o_bias, res))
        else:
            out.append((mixer.out_proj.weight, res))
        out.append((layer.moe.w2_EDI, res))
        shared = getattr(layer.ffn, "shared_moe", None)
        if shared is not None:
            out.append((shared.shared.down_proj.weight, res))
    return out


def _after_load(cfg: ModelConfig, model: nn.Module, updated: set[int] | None = None) -> None:
    """The multipliers folded into the weights just written (all after a load; after a weight update, the ones in
    `updated`, each once), then the "hf" kind's conversions."""
    with torch.no_grad():
        for t, factor in _factors(cfg, model):
            if factor == 1.0 or (updated is not None and id(t) not in updated):
                continue
            if not t.is_floating_point() or t.element_size() < 2:
                raise ValueError(f"{cfg.architecture}: its muP multipliers fold into float weights; this one is "
                                 f"{t.dtype} (quantized checkpoints are not supported).")
            t.mul_(factor)
    converted(cfg, model, updated)


CHECKPOINT.add("granite_mup", CheckpointKind(aliased, _after_load))

__all__: list[str] = []
