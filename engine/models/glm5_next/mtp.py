"""GLM-5.3-Flash's next-n prediction (MTP) module as a speculative drafter (method "mtp"; MTP layout "glm5_next").

Legend: T tokens in the flat batch, D hidden, V vocab.

transformers 5.24 neither builds nor loads it (Glm5NextTextModel stops at num_hidden_layers; its docs: "does not
include an MTP layer"). Its structure is the one vLLM (vllm/models/glm5next/nvidia/mtp.py, Glm5NextMTP, merged in
vllm-project/vllm#53906) and SGLang (python/sglang/srt/models/glm5_next_nextn.py, DeepSeek's NextN layer over the
GLM-5.3 config) build from the release: config.json's text_config num_nextn_predict_layers modules (the release: one),
module i under `model.language_model.layers.{num_hidden_layers + i}.` (read as `model.layers.{L}.`, the text model's
prefix stripped as for every tensor), in DeepSeek's next-n names:
    enorm.weight, hnorm.weight [D], eh_proj.weight [D, 2D]
    input_layernorm, self_attn.*, post_attention_layernorm, mlp.*   ONE decoder layer in a main layer's names with NO
        hyper-connection tensors (the release ships no hc_* there): a plain pre-norm layer, its attention the NoPE MLA
        with a full pooled DSA indexer of its own (never KDA, never a shared selection), its MLP the routed experts
        and the shared expert, every SwiGLU clamped at swiglu_limit as in the main layers
    shared_head.norm.weight [D]     the final norm
    embed_tokens.weight, shared_head.head.weight    optional: the main model's embedding / LM head where absent (the
                                    release ships neither; vLLM binds the main head)
It conditions on the main model's final-normed state (the streams' mean, then model.norm: vLLM's draft config sets
hc_mult 1), and the row at position 0 reads a zero embedding (vLLM's fused_eh_norm). For a token at position t with
conditioning state h_t and the next token tok_{t+1}:
    x = eh_proj([enorm(emb(tok_{t+1}) or 0 at t = 0) | hnorm(h_t)]);  y, r = layer(x)
    out = shared_head.norm(y + r);  logits(tok_{t+2}) = head(out)
and `out` (final-normed: vLLM recycles the post-norm state) conditions the next chained draft
(engine/models/normed_mtp.py). It is a full-attention layer: it keeps no KDA state, and the main model's KDA states
roll back past rejected drafts as for any drafter. Its KV cache is one MLA cache layer (with the pooled indexer's
rows) at index num_hidden_layers.
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


def mtp_names(cfg: ModelConfig) -> MTPNames:
    """Module 0's names, under `model.layers.{num_hidden_layers}.`; the inner layer's as planned."""
    p = f"model.layers.{cfg.num_layers}."
    return MTPNames(enorm=p + "enorm.weight", hnorm=p + "hnorm.weight", eh_proj=p + "eh_proj.weight",
                    norm=p + "shared_head.norm.weight", embed=p + "embed_tokens.weight",
                    head=p + "shared_head.head.weight", publish=lambda name: name, mask_position0=True)


def glm5_next_mtp_checkpoint_names(cfg: ModelConfig, names: Collection[str]) -> list[str]:
    """The tensors of `names` of the MTP modules (`model.layers.{num_hidden_layers + i}.*`): the drafter's only."""
    prefixes = tuple(f"model.layers.{cfg.num_layers + i}." for i in range(cfg.num_nextn_predict_layers))
    return sorted(n for n in names if prefixes and n.startswith(prefixes))


def _build(cfg: ModelConfig, spec: ArchSpec, i: int, kernels, device: torch.device, ep: ExpertParallel | None = None,
           checkpoint_names=None, *, embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
           tp: TensorParallel | None = None) -> nn.Module:
    """Module 0 (module docstring): a pre-norm layer (not the main layers' hyper-connections), the model's MLA with a
    full pooled indexer (`attention`, which every layer past the main ones runs) and the routed experts."""
    if i != 0:
        raise ValueError(f"MTP layer {i}: the drafter runs GLM-5.3-Flash's module 0 only.")
    layer_spec = replace(spec, residual="prenorm")
    layer_cfg = replace(cfg, sparse_layers=(cfg.num_layers,))
    return NormedMTPLayer(cfg, mtp_names(cfg), layer_spec, layer_cfg, kernels, device, ep, checkpoint_names,
                          embed_tokens=embed_tokens, lm_head=lm_head, tp=tp)


MTP_LAYOUTS.add("glm5_next", MTPLayout(_build, glm5_next_mtp_checkpoint_names))

__all__ = ["glm5_next_mtp_checkpoint_names", "mtp_names"]
