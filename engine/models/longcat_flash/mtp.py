"""LongCat-Flash's multi-token prediction (MTP) module as a speculative drafter (method "mtp"; MTP layout "longcat").

Legend: T tokens in the flat batch, D hidden, V vocab.

transformers 5.24 loads none of it (`_keys_to_ignore_on_load_unexpected = [r"model\\.mtp.*"]`) and its config names
no count; the release ships one module (vLLM's LongCatFlashMTP reads exactly one, the count config.json's
num_nextn_predict_layers where it has one: Architecture.mtp_unstated). Its tensors, as Meituan publishes them:
    model.mtp.embed_tokens.weight [V, D]                     its own embedding (the main model's where absent)
    model.mtp.layers.0.enorm.m.weight, hnorm.m.weight [D]    RMSNorms of the embedding and of the conditioning state
    model.mtp.layers.0.eh_proj.weight [D, 2D]                no bias
    model.mtp.layers.0.input_layernorm.weight, post_attention_layernorm.weight [D]
    model.mtp.layers.0.self_attn.*                           ONE MLA (q LoRA), shaped as a main sublayer's
    model.mtp.layers.0.transformer_layer.mlp.{gate,up,down}_proj.weight   a dense MLP of ffn_hidden_size
    model.mtp.norm.weight [D]                                the final norm
and the main model's LM head. Unlike a main layer (two sublayers, the shortcut-connected experts), the inner layer is
a plain pre-norm decoder layer with no experts (DeepSeek-V3's layer with n_routed_experts unset). For a token at
position t with conditioning state h_t (the main model's final-normed state) and the next token tok_{t+1}:
    x = eh_proj([enorm(emb(tok_{t+1})) | hnorm(h_t)]);  y, r = layer(x)
    out = norm(y + r);  logits(tok_{t+2}) = lm_head(out)
and `out` (final-normed) conditions the next chained draft. Its MLA carries the main layers' LoRA scales
(MLAConfig q_scale / latent_scale: LongCat's mla_scale_q_lora / mla_scale_kv_lora apply to every MLA of the model).
Its KV cache is one MLA cache layer at index num_hidden_layers (after the 2 * num_layers sublayers' caches).

Tensor parallelism (`tp`): the inner layer splits as a main sublayer does (heads, the MLP), the embedding and head
are vocab shards (the logits all-gathered), eh_proj is replicated (the same input on every rank).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Collection

import torch
from torch import nn

from moelink.moe.layer import ExpertParallel

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ...tp.group import TensorParallel
from ..blocks.mtp import MTP_LAYOUTS, MTPLayout
from ..normed_mtp import MTPNames, NormedMTPLayer

PREFIX = "model.mtp."
LAYER = PREFIX + "layers.0."


def _publish(name: str) -> str:
    """The inner layer's plan name (model.layers.{L}.<rest>) → the published one: its MLP under transformer_layer."""
    rest = name.split(".", 3)[3]
    return LAYER + ("transformer_layer." + rest if rest.startswith("mlp.") else rest)


NAMES = MTPNames(enorm=LAYER + "enorm.m.weight", hnorm=LAYER + "hnorm.m.weight", eh_proj=LAYER + "eh_proj.weight",
                 norm=PREFIX + "norm.weight", embed=PREFIX + "embed_tokens.weight", head=None, publish=_publish)


def longcat_mtp_checkpoint_names(cfg: ModelConfig, names: Collection[str]) -> list[str]:
    """The tensors of `names` under `model.mtp.`: read by the drafter only (the main model leaves them unread)."""
    return sorted(n for n in names if n.startswith(PREFIX))


def _build(cfg: ModelConfig, spec: ArchSpec, i: int, kernels, device: torch.device, ep: ExpertParallel | None = None,
           checkpoint_names=None, *, embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
           tp: TensorParallel | None = None) -> nn.Module:
    """The one module (module docstring): a plain pre-norm layer, MLA + a dense MLP (not the main layers' shortcut
    pair, no experts)."""
    if i != 0:
        raise ValueError(f"MTP layer {i} does not exist: LongCat-Flash publishes one MTP module.")
    layer_spec = replace(spec, residual="prenorm", sublayers=1)
    return NormedMTPLayer(cfg, NAMES, layer_spec, replace(cfg, sparse_layers=()), kernels, device, ep,
                          checkpoint_names, embed_tokens=embed_tokens, lm_head=lm_head, tp=tp)


MTP_LAYOUTS.add("longcat", MTPLayout(_build, longcat_mtp_checkpoint_names))

__all__ = ["LAYER", "NAMES", "PREFIX", "longcat_mtp_checkpoint_names"]
