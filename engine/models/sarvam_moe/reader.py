"""Sarvam-MoE's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from dataclasses import replace

from ...config.refusals import unsupported
from ...config.reader_parts import MAX_WIDTH, gqa, noaux_tc_moe, rope_config, rotary_dim


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Sarvam-MoE as transformers 5.24 builds it (Glm4MoeForCausalLM on SarvamMoEConfig, whose attribute_map reads
    the published num_experts / num_shared_experts / use_qkv_bias): GLM-4.5's attention (GQA, per-head q/k RMSNorm
    before the rotary when use_qk_norm, the rotary over partial_rotary_factor of each head: 1.0 for Sarvam, biases on
    q/k/v alone with attention_bias) and DeepSeek-V3's MoE block (sigmoid scores of the float32 router, the top-k of
    scores + the correction bias within the topk_group best of n_group groups, renormalised when norm_topk_prob,
    times routed_scaling_factor) beside n_shared_experts shared experts; the first first_k_dense_replace layers a dense
    MLP of intermediate_size. num_mtp_layers' modules are not in the released checkpoints and are not read."""
    layers = c["num_layers"]
    E = getattr(hf, "n_routed_experts", None)
    if isinstance(E, bool) or not isinstance(E, int) or E < 1:
        raise unsupported("num_experts", E, "a positive integer (n_routed_experts)")
    shared = getattr(hf, "n_shared_experts", None)
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared <= MAX_WIDTH:
        raise unsupported("num_shared_experts", shared, "an integer >= 0 (n_shared_experts)")
    first = getattr(hf, "first_k_dense_replace", 0)
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first < layers:
        raise unsupported("first_k_dense_replace", first, f"an integer in [0, num_hidden_layers={layers})")
    if getattr(hf, "mlp_bias", False):
        raise unsupported("mlp_bias", True, (False,), " (moelink's MLPs have no bias)")
    factor = float(rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0))
    fields = noaux_tc_moe(hf, c, E, tuple("dense" if i < first else "sparse" for i in range(layers)), shared)
    fields["moe"] = replace(fields["moe"], first_k_dense_replace=first)
    return dict(fields, attention=gqa(c, rope_config(rope, c, rotary_dim(c["head_dim"], factor)),
                                      qk_norm=bool(getattr(hf, "use_qk_norm", False)),
                                      qkv_bias=bool(getattr(hf, "attention_bias", False))))


__all__ = ["read"]
