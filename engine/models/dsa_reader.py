"""config.json → the DeepSeek Sparse Attention parts of ModelConfig (DeepSeek-V3.2, GLM-5): each layer's lightning
indexer and which layers are routed. engine/models/deepseek/reader.py reads the rest (MoE routing, MLA shapes) as for DeepSeek-V3.

transformers' model is the definition: DeepseekV32Indexer / GlmMoeDsaIndexer (the half-split or interleaved rope of
the index heads), GLM-5's indexer_types ("full" runs an indexer, "shared" reuses the previous full layer's top-k),
mlp_layer_types ("dense" / "sparse" per layer, derived from first_k_dense_replace when absent).
"""
from __future__ import annotations

import dataclasses

from .mla_config import MLAConfig
from ..config.refusals import unsupported
from .dsa_config import IndexerConfig

_INDEXER_TYPES = ("full", "shared")
_MLP_TYPES = ("dense", "sparse")
# The indexer's rope pairing as transformers runs it: DeepSeek-V3.2 rotates half-split pairs (unlike its MLA rope),
# GLM-5 interleaved pairs (as its MLA rope).
_ROPE_STYLE = {"DeepseekV32ForCausalLM": "neox", "GlmMoeDsaForCausalLM": "interleaved"}


def dsa_sparse_layers(hf, num_layers: int) -> tuple[int, ...]:
    """The routed layers: mlp_layer_types' "sparse" ones (transformers fills the field from first_k_dense_replace)."""
    types = list(getattr(hf, "mlp_layer_types", None) or [])
    if len(types) != num_layers or any(t not in _MLP_TYPES for t in types):
        raise unsupported("mlp_layer_types", types, f"one of {', '.join(map(repr, _MLP_TYPES))} for each of the "
                                                   f"num_hidden_layers={num_layers} layers")
    return tuple(i for i, t in enumerate(types) if t == "sparse")


def dsa_attention(arch: str, hf, num_layers: int, mla: MLAConfig, rope_style: str | None = None,
                  **indexer_fields) -> dict:
    """`attention` (the first layer's: a full indexer) and, where GLM-5 or Hy4 share selections, `layer_attention`
    (one MLAConfig per layer, shared ones without weights or key cache). `rope_style` (default: _ROPE_STYLE's) and
    `indexer_fields` (IndexerConfig's rope_position, k_norm_eps) for a family that varies them (Hy4)."""
    if mla.q_lora_rank is None:
        raise unsupported("q_lora_rank", None, "a positive integer", f" for {arch} (its indexer reads the q latent)")
    types = ["full"] * num_layers
    if arch != "DeepseekV32ForCausalLM":  # GLM-5's and Hy4's indexer_types
        types = list(getattr(hf, "indexer_types", None) or types)
        if len(types) != num_layers or any(t not in _INDEXER_TYPES for t in types) or types[0] != "full":
            raise unsupported("indexer_types", types, f"one of {', '.join(map(repr, _INDEXER_TYPES))} for each of the "
                                                      f"num_hidden_layers={num_layers} layers, the first 'full' (a "
                                                      "shared layer reuses the previous full layer's selection)")
    indexer = IndexerConfig(int(hf.index_n_heads), int(hf.index_head_dim), int(hf.index_topk), mla.qk_rope_head_dim,
                            rope_style or _ROPE_STYLE[arch], **indexer_fields)
    full = dataclasses.replace(mla, indexer=indexer)
    if "shared" not in types:
        return dict(attention=full)
    shared = dataclasses.replace(mla, indexer=dataclasses.replace(indexer, shared=True))
    return dict(attention=full, layer_attention=tuple(full if t == "full" else shared for t in types))
