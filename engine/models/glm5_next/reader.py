"""GLM-5.3-Flash's config reader.

config.json's text_config, as transformers reads it (Glm5NextTextConfig), onto ModelConfig's fields
(engine/config/hf_readers.read_fields calls `read` after the common fields); a value moelink cannot run is refused
naming the field.
"""
from __future__ import annotations

import dataclasses

from ..hyper_connections_config import HyperConnectionConfig
from ..mla_config import MLAConfig
from ..rope_config import RopeConfig
from ...config.refusals import unsupported
from ..kimi_delta_config import KimiDeltaConfig
from ...config.reader_parts import MLP_TYPES, layer_kinds, mla_fields, noaux_tc_moe
from ..dsa_config import IndexerConfig

_LAYER_TYPES = ("linear_attention", "indexed_attention")
_INDEXER_TYPES = ("full", "shared")
# The MLA layers have no rope (qk_rope_head_dim 0): moelink holds a zero rope part this wide (MLAConfig.
# rope_in_checkpoint), the width DeepSeek's MLA kernels are built for, so they run GLM-5.3's layers unchanged.
NOPE_PAD_DIMS = 64


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """GLM-5.3-Flash as transformers 5.24 builds it (Glm5NextTextModel): layer_types names each layer Kimi Delta
    Attention ("linear_attention": linear_num_heads heads of linear_head_dim, a short convolution of
    linear_conv_kernel_dim, the safe forget gate linear_lower_bound * sigmoid(exp(A_log) * x), or Kimi's softplus one
    when it is null) or MLA without rope ("indexed_attention": q LoRA, kv_lora_rank latent, q heads of
    qk_nope_head_dim, softmax scale qk_nope_head_dim^-0.5) with GLM-5's DSA indexer over pools of index_kpool tokens
    (indexer_types: "full" runs it, "shared" reuses the previous layer's selection); hc_mult hyper-connection streams
    (Sinkhorn over hc_sinkhorn_iters passes, floor hc_eps) around every block, their plain mean before the final
    norm; mlp_layer_types a dense MLP or routed experts (sigmoid noaux_tc over n_group groups, renormalised when
    norm_topk_prob, times routed_scaling_factor) beside n_shared_experts shared ones, every SwiGLU clamped at
    swiglu_limit."""
    n = c["num_layers"]
    layer_types = layer_kinds(hf, "layer_types", _LAYER_TYPES, n)
    mlp_types = layer_kinds(hf, "mlp_layer_types", MLP_TYPES, n)
    indexer_types = layer_kinds(hf, "indexer_types", _INDEXER_TYPES, n)
    if "indexed_attention" not in layer_types:  # the model's attention kind is its MLA layers'
        raise unsupported("layer_types", list(layer_types), "at least one 'indexed_attention' layer")
    for i, (lt, it) in enumerate(zip(layer_types, indexer_types)):
        # transformers hands a shared layer the selection of the layer just before it, which must run an indexer.
        if lt == "indexed_attention" and it == "shared" and (
                i == 0 or layer_types[i - 1] != "indexed_attention" or indexer_types[i - 1] != "full"):
            raise unsupported("indexer_types", list(indexer_types), "'shared' only on an indexed_attention layer right "
                                                                    "after a 'full' indexed_attention one")
    if int(hf.qk_rope_head_dim) != 0:
        raise unsupported("qk_rope_head_dim", hf.qk_rope_head_dim, (0,), f" for {arch} (its MLA layers have no rope)")
    if getattr(hf, "q_lora_rank", None) is None:
        raise unsupported("q_lora_rank", None, "a positive integer", f" for {arch} (its indexer reads the q latent)")
    if not getattr(hf, "index_kpool_always_select_tail", True):
        raise unsupported("index_kpool_always_select_tail", False, (True,),
                          " (a query attends to its own incomplete pool)")
    f = mla_fields(hf, c)
    if f["attention_bias"]:
        raise unsupported("attention_bias", True, (False,), f" for {arch}")
    nope = f["qk_nope_head_dim"]
    indexer = IndexerConfig(int(hf.index_n_heads), int(hf.index_head_dim), int(hf.index_topk), 0,
                            kpool=int(hf.index_kpool))
    mla = MLAConfig(**dict(f, qk_rope_head_dim=NOPE_PAD_DIMS), rope=RopeConfig(NOPE_PAD_DIMS, c["rope_theta"]),
                    softmax_scale=nope**-0.5, indexer=indexer, rotary=False, rope_in_checkpoint=False)
    shared = dataclasses.replace(mla, indexer=dataclasses.replace(indexer, shared=True))
    lower = getattr(hf, "linear_lower_bound", None)
    kda = KimiDeltaConfig(int(hf.linear_num_heads), int(hf.linear_num_heads), int(hf.linear_head_dim),
                          int(hf.linear_head_dim), int(hf.linear_conv_kernel_dim),
                          gate_lower_bound=float(lower) if lower is not None else None, a_log_float32=True)
    moe = noaux_tc_moe(hf, c, int(hf.n_routed_experts), mlp_types, int(getattr(hf, "n_shared_experts", 0) or 0))
    limit = float(hf.swiglu_limit)
    moe["moe"] = dataclasses.replace(moe["moe"], activation="silu_clamp", swiglu_limit=limit,
                                     dense_activation="silu_clamp")
    hc = HyperConnectionConfig(int(hf.hc_mult), int(hf.hc_sinkhorn_iters), float(hf.hc_eps))
    return dict(num_kv_heads=c["num_heads"], attention=mla, hyper_connections=hc,
                layer_attention=tuple(kda if lt == "linear_attention" else (shared if it == "shared" else mla)
                                      for lt, it in zip(layer_types, indexer_types)),
                **moe)


__all__ = ["NOPE_PAD_DIMS", "read"]
