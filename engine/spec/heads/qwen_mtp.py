"""Qwen3-Next's and Qwen3.5-MoE's multi-token prediction (MTP) module as a speculative drafter (method "mtp").

Legend: T tokens in the flat batch, D hidden, V vocab.

Both families publish `mtp_num_hidden_layers` modules (one in every release) beside the main model, under a layout
of their own (not DeepSeek's `model.layers.{L}.*`, engine/spec/heads/mtp.py): the tensors sit at the checkpoint's top
level, outside the text model's prefix (so a Qwen3.5 multimodal checkpoint keeps them at `mtp.*` too):
    mtp.pre_fc_norm_embedding.weight, mtp.pre_fc_norm_hidden.weight [D]   zero-centred RMSNorms (weight + 1)
    mtp.fc.weight [D, 2D]                                                  no bias
    mtp.layers.{i}.*   one gated full-attention decoder layer, exactly a main full-attention layer's tensors
                       (q/k norms, the output gate inside q_proj, the MoE with its gated shared expert)
    mtp.norm.weight [D]                                                    the final norm (zero-centred)
The embedding and the LM head are the main model's (no copies).

For a token at position t with conditioning state h_t (the main model's final-normed hidden state) and the next
token tok_{t+1} (vLLM's and SGLang's qwen3_next_mtp, the order of the concatenation included):
    x = fc([pre_fc_norm_embedding(emb(tok_{t+1})) | pre_fc_norm_hidden(h_t)]);  y, r = layer(x)
    out = norm(y + r);  logits(tok_{t+2}) = lm_head(out)
and `out` (final-normed, unlike DeepSeek's pre-norm state) conditions the next chained draft. transformers loads
none of it (`_keys_to_ignore_on_load_unexpected = ["^mtp.*"]`).

It is the shared final-normed MTP module (engine/models/normed_mtp.py, LongCat-Flash's and Ling hybrid's too) under
Qwen's names. The inner layer is the main decoder's layer, built alone (`moe_decoder.lone_layer`) at index
num_hidden_layers + i: its
attention is the model's full-attention config (`ModelConfig.attention_for` past the main layers), its KV cache `ctx.kv_caches[L]` (the
drafter's cache layer, engine/spec/proposer/chain.py), and it keeps no linear-attention state. Its MLP is routed
when the main layer 0 is (vLLM builds it with layer index 0 for `mlp_only_layers` / `decoder_sparse_step`).

Tensor parallelism (`tp`): the inner layer is built with the same TP strategy objects as a main layer (heads split,
the gated output with them, experts split or in EP), the embedding and head are the main model's vocab shards (the
logits all-gathered: every rank takes the same greedy draft), and fc is replicated: its input is the same on every
rank, so each computes the whole [T, D] projection (no collective for one D x 2D matrix).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Collection

import torch

from moelink.moe.layer import ExpertParallel

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ...models.normed_mtp import MTPNames, NormedMTPLayer
from ...tp.group import TensorParallel

PREFIX = "mtp."


def qwen_mtp_checkpoint_names(names: Collection[str]) -> list[str]:
    """The tensors of `names` that belong to the MTP modules (`mtp.*`): read by the drafter only."""
    return sorted(n for n in names if n.startswith(PREFIX))


def qwen_mtp_names(cfg: ModelConfig, i: int) -> MTPNames:
    """Module i's names: its own norms and fc at the top of `mtp.`, its layer at `mtp.layers.{i}.`, the main model's
    embedding and head."""
    inner = f"model.layers.{cfg.num_layers + i}."
    return MTPNames(enorm=PREFIX + "pre_fc_norm_embedding.weight", hnorm=PREFIX + "pre_fc_norm_hidden.weight",
                    eh_proj=PREFIX + "fc.weight", norm=PREFIX + "norm.weight", embed=None, head=None,
                    publish=lambda name: f"{PREFIX}layers.{i}." + name[len(inner):] if name.startswith(inner) else name)


class QwenMTPLayer(NormedMTPLayer):
    """MTP module `i` of a Qwen3-Next / Qwen3.5-MoE checkpoint (module docstring). `embed_tokens` / `lm_head`: the
    main model's (MoEDecoderForCausalLM's); `checkpoint_names` decides the experts' on-disk layout."""

    def __init__(self, cfg: ModelConfig, spec: ArchSpec, i: int, kernels, device: torch.device,
                 ep: ExpertParallel | None = None, checkpoint_names: Collection[str] | None = None, *,
                 embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
                 tp: TensorParallel | None = None):
        if not 0 <= i < cfg.num_nextn_predict_layers:
            raise ValueError(f"MTP layer {i} does not exist: config.json mtp_num_hidden_layers="
                             f"{cfg.num_nextn_predict_layers}.")
        if embed_tokens is None or lm_head is None:
            raise ValueError("QwenMTPLayer shares the main model's embedding and LM head: pass embed_tokens=... and "
                             "lm_head=... (the checkpoint holds no MTP copies).")
        # Its MLP is routed when the main layer 0 is (vLLM builds it with layer index 0).
        L = cfg.num_layers + i
        layer_cfg = replace(cfg, sparse_layers=(L,) if 0 in cfg.sparse_layers else ())
        super().__init__(cfg, qwen_mtp_names(cfg, i), spec, layer_cfg, kernels, device, ep, checkpoint_names,
                         embed_tokens=embed_tokens, lm_head=lm_head, tp=tp, index=i)


__all__ = ["PREFIX", "QwenMTPLayer", "qwen_mtp_checkpoint_names", "qwen_mtp_names"]
