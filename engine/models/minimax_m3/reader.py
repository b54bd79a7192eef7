"""MiniMax-M3's config reader.

config.json (a multimodal file's text_config), as transformers read it, onto ModelConfig's fields
(engine/config/hf_readers.read_fields calls `read` after the common fields); a value moelink cannot run is refused
naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..block_sparse_config import BlockIndexerConfig, BlockSparseConfig
from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import MLP_TYPES, layer_kinds, rope_config, rotary_dim

ATTENTION_TYPES = ("full_attention", "minimax_m3_sparse")


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """MiniMax-M3's text model, as transformers 5.24 builds it (MiniMaxM3VLForCausalLM): every layer GQA with q and k
    RMS-normed per head before rotary, rotary over int(head_dim * partial_rotary_factor) dims (transformers 5.24's
    MiniMax-M3 config, unlike MiniMax-M2's, does not turn a rotary_dim field into that factor: moelink reads the file
    as transformers does); layer_types minimax_m3_sparse adds the block indexer
    (engine/models/block_sparse_config.py: index_n_heads heads of index_head_dim, blocks of index_block_size
    positions, index_topk_blocks kept of which index_local_blocks the query's own and those before it);
    mlp_layer_types a dense MLP dense_intermediate_size wide, or intermediate_size-wide routed experts (sigmoid
    scores, the top-k of scores + e_score_correction_bias, the unbiased weights renormalised and times
    routed_scaling_factor) beside one shared expert shared_intermediate_size wide; every MLP the clamped SwiGLU
    (swiglu_alpha, swiglu_limit; transformers rewrites hidden_act to silu and never reads it); every norm zero-centred
    (weight + 1). Quantized experts: FP8 only (the 4-bit formats run SiLU-gated experts)."""
    layers = c["num_layers"]
    mlp_types = layer_kinds(hf, "mlp_layer_types", MLP_TYPES, layers)
    quant = c.get("quantization")
    if quant is not None and quant.method != "fp8" and any(
            quant.is_quantized(f"model.layers.{i}.block_sparse_moe.experts")  # what the routed FFN asks (ffn.py)
            for i, t in enumerate(mlp_types) if t == "sparse"):
        # moelink's 4-bit expert formats run SiLU-gated experts only (moe/layer.py): the clamped SwiGLU runs in
        # float and FP8 experts (and gpt-oss's MXFP4).
        raw = getattr(hf, "quantization_config", None)
        method = raw.get("quant_method", quant.method) if isinstance(raw, dict) else quant.method
        raise unsupported("quantization_config.quant_method", method, "none (float weights) or 'fp8'",
                          f" for {arch}: its experts' clamped SwiGLU (swiglu_alpha, swiglu_limit) runs in float "
                          f"and FP8 experts only")
    attn_types = layer_kinds(hf, "layer_types", ATTENTION_TYPES, layers)
    factor = rope.get("partial_rotary_factor", 1.0)
    rope_cfg = rope_config(rope, c, rotary_dim(c["head_dim"], factor))
    indexer = None
    if "minimax_m3_sparse" in attn_types:
        indexer = BlockIndexerConfig(hf.index_n_heads, hf.index_head_dim, hf.index_block_size, hf.index_topk_blocks,
                                     hf.index_local_blocks)

    def layer(sparse: bool) -> BlockSparseConfig:
        return BlockSparseConfig(c["num_heads"], c["num_kv_heads"], c["head_dim"], rope_cfg, qk_norm="per_head",
                                 indexer=indexer if sparse else None)

    per_layer = tuple(layer(t == "minimax_m3_sparse") for t in attn_types)
    E = int(hf.num_local_experts)
    scaling = hf.routed_scaling_factor
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not scaling > 0:
        raise unsupported("routed_scaling_factor", scaling, "a number > 0")
    shared = int(hf.shared_intermediate_size or 0)
    if shared < 0:
        raise unsupported("shared_intermediate_size", shared, "an integer >= 0")
    # transformers' router: the logits in the model's dtype, sigmoid in float32 (MiniMax-M2's, with the scaling).
    router = RouterConfig(E, c["top_k"], "sigmoid", "noaux_tc", 1, 1, True, float(scaling))
    moe = MoEConfig(router, n_shared_experts=1 if shared else 0, shared_expert_intermediate_size=shared,
                    activation="swiglu_oai", dense_activation="swiglu_oai", swiglu_alpha=float(hf.swiglu_alpha),
                    swiglu_limit=float(hf.swiglu_limit))
    return dict(num_experts=E, moe_intermediate_size=int(hf.intermediate_size),
                intermediate_size=int(hf.dense_intermediate_size), norm_topk_prob=True,
                sparse_layers=tuple(i for i, t in enumerate(mlp_types) if t == "sparse"), moe=moe,
                attention=layer(False), layer_attention=per_layer, norm_weight_offset=1.0)


__all__ = ["ATTENTION_TYPES", "read"]
