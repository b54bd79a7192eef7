"""Qwen3-Next's and Qwen3.5-MoE's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

import dataclasses

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ..gated_deltanet_config import LinearAttentionConfig
from ...config.reader_parts import MAX_WIDTH, gqa, rope_config, rotary_dim


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Qwen3-Next and Qwen3.5-MoE's text model: layer_types says which layers run gated DeltaNet ("linear_attention": their shape is
    LinearAttentionConfig's, read from the linear_* fields) and which gated full attention ("full_attention": GQA
    with per-head q/k norm, a sigmoid output gate and partial rotary); norms are zero-centred (weight + 1); the MoE
    block has one shared expert of its own width behind a sigmoid gate, and softmax top-k routing."""
    layer_types = tuple(getattr(hf, "layer_types", None) or ())
    kinds = ("linear_attention", "full_attention")
    if len(layer_types) != c["num_layers"] or any(t not in kinds for t in layer_types):
        raise unsupported("layer_types", list(layer_types), f"one of {', '.join(map(repr, kinds))} for each of the "
                                                            f"num_hidden_layers={c['num_layers']} layers")
    if "full_attention" not in layer_types:
        raise unsupported("layer_types", list(layer_types), "at least one 'full_attention' layer")
    if getattr(hf, "attention_bias", False):
        raise unsupported("attention_bias", True, (False,), f" for {arch}")
    factor = float(rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0))
    rc = rope_config(rope, c, rotary_dim(c["head_dim"], factor))
    if arch == "Qwen3_5MoeForCausalLM":  # its rotary is 3-D for image tokens (transformers' default sections)
        rc = dataclasses.replace(rc, mrope_section=tuple(int(v) for v in rope.get("mrope_section", (11, 11, 10))))
    full = gqa(c, rc, qk_norm="per_head", output_gate=True)
    linear = LinearAttentionConfig(int(hf.linear_num_key_heads), int(hf.linear_num_value_heads),
                                   int(hf.linear_key_head_dim), int(hf.linear_value_head_dim),
                                   int(hf.linear_conv_kernel_dim),
                                   projection="split" if arch == "Qwen3_5MoeForCausalLM" else "fused")
    E = int(hf.num_experts)
    only_dense = set(getattr(hf, "mlp_only_layers", None) or [])
    step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
    sparse = tuple(i for i in range(c["num_layers"]) if i not in only_dense and E > 0 and (i + 1) % step == 0)
    norm = bool(getattr(hf, "norm_topk_prob", True))  # Qwen3.5 always renormalises (its config has no field)
    # transformers' Qwen3NextSparseMoeBlock (and Qwen3.5-MoE's) always builds the shared MLP at this width and its
    # sigmoid gate: at 0 the MLP is empty and adds exactly 0 to every token, gate or not. moelink reads 0 as that: no
    # shared expert, its empty tensors and its gate not read (the same tokens as transformers: tests/engine/
    # test_qwen3_next.py). A width is bounded as intermediate_size is (engine/config/model.py _DIMS).
    shared = getattr(hf, "shared_expert_intermediate_size", 0)
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared <= MAX_WIDTH:
        raise unsupported("shared_expert_intermediate_size", shared, f"an integer in [0, {MAX_WIDTH}] (0: no "
                                                                     f"shared expert)")
    moe = MoEConfig(RouterConfig(E, c["top_k"], norm_topk_prob=norm), n_shared_experts=1 if shared else 0,
                    shared_expert_intermediate_size=shared, shared_expert_gate=bool(shared))
    if len(sparse) < c["num_layers"] and not getattr(hf, "intermediate_size", None):
        raise unsupported("intermediate_size", getattr(hf, "intermediate_size", None),
                          "a positive integer (mlp_only_layers / decoder_sparse_step leave dense layers)")
    return dict(num_experts=E, moe_intermediate_size=int(hf.moe_intermediate_size),
                intermediate_size=int(getattr(hf, "intermediate_size", 0) or 0), norm_topk_prob=norm,
                sparse_layers=sparse, moe=moe, attention=full, layer_attention=tuple(linear if t == "linear_attention" else full for t in layer_types),
                norm_weight_offset=1.0)



__all__ = ["read"]
