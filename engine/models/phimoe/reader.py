"""PhiMoE's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from dataclasses import replace

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import gqa, rope_config


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Phi-3.5-MoE as transformers 5.24 builds it (PhimoeForCausalLM): Mixtral's layout (every layer routed,
    num_local_experts experts of intermediate_size) with SparseMixer routing (two picks, each weighted by a softmax
    masked at router_jitter_noise: RouterConfig topk_method "sparsemixer"); GQA with biases on q/k/v and o when
    attention_bias, a sliding window on every layer when sliding_window is set (transformers' mask); LayerNorms
    with biases (eps rms_norm_eps) and the LM head's bias when lm_head_bias (kinds.py reads it from hf_config).
    input_jitter_noise acts in training only."""
    if rope["rope_type"] not in ("default", "longrope"):
        # transformers' PhiMoE rotary scales cos/sin by short_mscale / long_mscale whatever the type (yarn's own
        # attention factor unused): only the published longrope and plain rope are its model.
        raise unsupported("rope_parameters.rope_type", rope["rope_type"], ("default", "longrope"), f" for {arch}")
    rotary = rope_config(rope, c, c["head_dim"])
    if rope["rope_type"] == "longrope":
        # transformers 5.24's PhiMoE takes its inverse frequencies from longrope's init without a sequence length
        # (short_factor at every position) and scales cos/sin by short_mscale up to original_max_position_embeddings
        # tokens, by long_mscale past them (recomputing the sequence without its cache when it crosses): one
        # static table when the two scales agree (the release's), which is what is built.
        short, long_ = rope.get("short_mscale"), rope.get("long_mscale")
        if short != long_:
            raise unsupported("rope_parameters.long_mscale", long_, (short,), f" for {arch} (a scale switching with "
                                                                            f"the sequence's length is not built)")
        rotary = replace(rotary, attention_factor=float(short))
    if c["quantization"] is not None:  # its LayerNorms have no fused FP8 input path (moe/fp8_input.py)
        raise unsupported("quantization_config", getattr(c["quantization"], "method", c["quantization"]), (None,),
                          f" for {arch} (float weights only)")
    if getattr(hf, "mlp_bias", False):
        raise unsupported("mlp_bias", True, (False,), f" for {arch} (transformers' experts have no bias)")
    E, inter = int(hf.num_local_experts), int(hf.intermediate_size)
    router = RouterConfig(E, c["top_k"], "softmax", "sparsemixer", norm_topk_prob=False,
                          jitter_eps=float(getattr(hf, "router_jitter_noise", 0.0) or 0.0))
    window = getattr(hf, "sliding_window", None)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise unsupported("sliding_window", window, "a positive integer or null")
    layers = tuple(range(c["num_layers"]))
    bias = bool(getattr(hf, "attention_bias", False))
    attention = gqa(c, rotary, qkv_bias=bias, o_bias=bias, sliding_window=window,
                    sliding_layers=layers if window is not None else ())
    return dict(num_experts=E, moe_intermediate_size=inter, intermediate_size=inter, norm_topk_prob=False,
                sparse_layers=layers, moe=MoEConfig(router), attention=attention)


__all__ = ["read"]
