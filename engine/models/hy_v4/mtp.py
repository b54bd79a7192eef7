"""Hunyuan Hy4's next-n prediction (MTP) module as a speculative drafter (method "mtp"; MTP layout "hy_v4").

Legend: T tokens in the flat batch, D hidden, V vocab.

transformers 5.24 neither builds nor loads it (HYV4ForCausalLM ignores `model.mtp_layers.*`; HYV4Config names no
count). Its structure is the one vLLM (vllm/models/hy_v4/nvidia/mtp.py, HYV4MTP) and SGLang
(python/sglang/srt/models/hunyuan_v4_nextn.py, HYV4ForCausalLMNextN) build from the release, and Alibaba's RTP-LLM
(rtp_llm/models/hy_v4.py, Hy4Mtp) the same: one module, tensors under `model.mtp_layers.0.` (config.json's
num_nextn_predict_layers where present, else one: Architecture.mtp_unstated, as vLLM and RTP-LLM default it):
    enorm.weight, hnorm.weight [D], eh_proj.weight [D, 2D]
    input_layernorm, self_attn.*, post_attention_layernorm, mlp.*   ONE decoder layer in the main layers' published
        names (Tencent's: self_attn.linear_gate, learnable_sink_param, the DSA indexer, mlp.experts.gate_up_proj
        fused, shared_experts; config.py's aliases apply as to a main layer), with NO hyper-connection tensors: a
        plain pre-norm layer (the checkpoint ships no hc_pre.*), its MLA running a full indexer of its own (never a
        shared selection) with the sinks and the element-wise output gate, its MLP routed (the experts' SwiGLU
        clamped at swiglu_limit, the shared experts not), as a main sparse layer
    final_layernorm.weight [D]      the final norm
and the main model's embedding and LM head (embed_tokens / shared_head under the prefix, if any, are not read, as
vLLM skips them). It conditions on the main model's final-normed state, one stream (after the hyper-head and
model.norm: vLLM's and RTP-LLM's hc_mult 1 for the draft), and the row at position 0 reads a zero embedding (vLLM's
HYV4MultiTokenPredictor). For a token at position t with conditioning state h_t and the next token tok_{t+1}:
    x = eh_proj([enorm(emb(tok_{t+1}) or 0 at t = 0) | hnorm(h_t)]);  y, r = layer(x)
    out = final_layernorm(y + r);  logits(tok_{t+2}) = lm_head(out)
and `out` (final-normed) conditions the next chained draft (engine/models/normed_mtp.py). Its KV cache is one MLA
cache layer (with the indexer's key rows) at index num_hidden_layers.
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

PREFIX = "model.mtp_layers.0."


def _publish(name: str) -> str:
    """The inner layer's plan name (model.layers.{L}.<rest>) → the published one (model.mtp_layers.0.<rest>)."""
    return PREFIX + name.split(".", 3)[3]


NAMES = MTPNames(enorm=PREFIX + "enorm.weight", hnorm=PREFIX + "hnorm.weight", eh_proj=PREFIX + "eh_proj.weight",
                 norm=PREFIX + "final_layernorm.weight", embed=None, head=None, publish=_publish, mask_position0=True)


def hy_v4_mtp_checkpoint_names(cfg: ModelConfig, names: Collection[str]) -> list[str]:
    """The tensors of `names` under `model.mtp_layers.`: read by the drafter only (the main model leaves them
    unread)."""
    return sorted(n for n in names if n.startswith("model.mtp_layers."))


def _build(cfg: ModelConfig, spec: ArchSpec, i: int, kernels, device: torch.device, ep: ExpertParallel | None = None,
           checkpoint_names=None, *, embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
           tp: TensorParallel | None = None) -> nn.Module:
    """Module 0 (module docstring): a pre-norm layer (not the main layers' independent hyper-connections), MLA with
    a full indexer (the model's `attention`, which every layer past the main ones runs) and the routed experts."""
    if i != 0:
        raise ValueError(f"MTP layer {i}: the drafter runs Hy4's module 0 only (model.mtp_layers.0.*).")
    layer_spec = replace(spec, residual="prenorm")
    layer_cfg = replace(cfg, sparse_layers=(cfg.num_layers,))
    return NormedMTPLayer(cfg, NAMES, layer_spec, layer_cfg, kernels, device, ep, checkpoint_names,
                          embed_tokens=embed_tokens, lm_head=lm_head, tp=tp)


MTP_LAYOUTS.add("hy_v4", MTPLayout(_build, hy_v4_mtp_checkpoint_names))

__all__ = ["NAMES", "PREFIX", "hy_v4_mtp_checkpoint_names"]
