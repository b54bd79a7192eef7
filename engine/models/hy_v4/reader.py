"""Hunyuan Hy4's config reader (engine/config/hf_readers.read_fields calls `read` after the common fields).

config.json as transformers 5.24's HYV4ForCausalLM runs it (modular_hy_v4.py is the definition):
- attention: every layer "indexed_attention": MLA with q LoRA, the rope (half-split pairs, "neox") on the last
  qk_rope_head_dim dims of q and k, softmax scale (qk_nope + qk_rope)^-0.5 with yarn's mscale; a learned sink logit per
  head (gpt-oss's eager softmax) and an element-wise sigmoid gate [N * v_head_dim] from the layer input on the output
  (MLAConfig.sinks, output_gate_values);
- DSA: DeepSeek-V3.2's lightning indexer (its key's LayerNorm with eps rms_norm_eps, the rope on each index head's last
  qk_rope_head_dim dims: IndexerConfig.rope_position "last"), indexer_types "full" / "shared" (a shared layer reuses
  the previous layer's top-k, as GLM-5);
- hyper-connections: hc_mult streams, independent (no mixing matrix), post gate hc_magnitude * sigmoid + hc_eps
  (HyperConnectionConfig comb False);
- FFN: mlp_layer_types "dense" (an MLP of intermediate_size) or "sparse": sigmoid scores in float32, noaux_tc top-k
  (n_group / topk_group), renormalised when norm_topk_prob, times routed_scaling_factor; routed experts with the SwiGLU
  clamped at swiglu_limit (gate from above, up both ways), n_shared_experts unclamped shared experts.
A value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

import dataclasses

from ..dsa_reader import dsa_attention
from ..hyper_connections_config import HyperConnectionConfig
from ..mla_config import MLAConfig
from ...config.refusals import unsupported
from ...config.reader_parts import MLP_TYPES, layer_kinds, mla_fields, noaux_tc_moe, rope_config, yarn_apply_mscale

LAYER_TYPES = ("indexed_attention",)


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Hy4's fields (module docstring)."""
    layers = c["num_layers"]
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise unsupported("hidden_act", hf.hidden_act, ("silu",))
    layer_kinds(hf, "layer_types", LAYER_TYPES, layers)
    mlp_types = layer_kinds(hf, "mlp_layer_types", MLP_TYPES, layers)
    f = mla_fields(hf, c)
    nope, pe = f["qk_nope_head_dim"], f["qk_rope_head_dim"]
    if f["q_lora_rank"] is None:
        raise unsupported("q_lora_rank", None, "a positive integer (Hy4's indexer reads the q latent)")
    # transformers clamps the routed experts at swiglu_limit whatever its value (its docstring's "at or below zero
    # disables" is not what its experts run): a clamp at <= 0 is refused rather than guessed.
    limit = float(hf.swiglu_limit)
    if not limit > 0:
        raise unsupported("swiglu_limit", limit, "a number > 0 (transformers' HYV4Experts clamp at it)")
    mla = MLAConfig(**f, rope=rope_config(rope, c, pe, "neox"),
                    softmax_scale=float(yarn_apply_mscale(rope, (nope + pe) ** -0.5)),
                    output_gate=True, output_gate_values=True, sinks=True)
    moe = noaux_tc_moe(hf, c, int(hf.n_routed_experts), mlp_types, int(hf.n_shared_experts or 0))
    moe["moe"] = dataclasses.replace(moe["moe"], activation="silu_clamp", swiglu_limit=limit)
    hc = HyperConnectionConfig(int(hf.hc_mult), 0, float(hf.hc_eps), comb=False, post_mult=float(hf.hc_magnitude),
                               post_eps=True)
    return dict(num_kv_heads=c["num_heads"], **moe, hyper_connections=hc,
                **dsa_attention(arch, hf, layers, mla, "neox", rope_position="last", k_norm_eps=float(hf.rms_norm_eps)))


__all__ = ["read"]
