"""Llama 4's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import MAX_WIDTH, gqa, layer_kinds, rope_config

ATTENTION_TYPES = ("chunked_attention", "full_attention")


def read_config(raw: dict, transformers_knows: bool, path: str):
    """config.json's text model (model_type llama4_text: a Llama4ForCausalLM file, or a published wrapper's
    text_config) through transformers' Llama4TextConfig, attn_temperature_tuning read as a bool first: Meta's
    Scout and Maverick files write 4, which transformers 4's model read as true (`if self.attn_temperature_tuning
    and not self.use_rope`) and transformers 5.24's strict config refuses. Any other value goes to transformers as
    it is (its error names the field)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
    tuning = fields.get("attn_temperature_tuning")
    if isinstance(tuning, (int, float)) and not isinstance(tuning, bool):
        fields["attn_temperature_tuning"] = bool(tuning)
    return AutoConfig.for_model("llama4_text", **fields)


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Llama 4's text model as transformers 5.24 builds it (Llama4ForCausalLM, Llama4TextConfig):
    - attention: GQA (biases on q/k/v/o when attention_bias), one layer config per kind (ModelConfig.layer_attention).
      A layer rotates when no_rope_layers[i] is 1 (transformers' default: every no_rope_layer_interval-th layer is
      NoPE), by the complex (interleaved pairs) rope of rope_parameters (default or llama3 scaling); its q and k then
      get the weightless L2 norm when use_qk_norm. A NoPE layer's q is scaled by the attention temperature when
      attn_temperature_tuning (floor_scale, attn_scale). layer_types' "chunked_attention" layers (transformers: the
      rope layers, when attention_chunk_size is set) attend within their attention_chunk_size chunk of positions.
    - FFN: the layers of moe_layers (transformers fills it from interleave_moe_layer_step) route each token to its
      top-1 of num_local_experts by its logit, the sigmoid of that logit scaling the expert's input, beside a shared
      expert; both intermediate_size wide. The others are dense MLPs intermediate_size_mlp wide.
    Refused: num_experts_per_tok other than 1 (the routing weight scales the expert's input: top-1 only), any
    quantization_config (the published FP8 formats are not mapped yet)."""
    layers = c["num_layers"]
    if c["quantization"] is not None:
        raise unsupported("quantization_config", getattr(c["quantization"], "method", c["quantization"]), "none",
                          f" for {arch} yet")
    attention_types = layer_kinds(hf, "layer_types", ATTENTION_TYPES, layers)
    flags = list(getattr(hf, "no_rope_layers", None) or [])
    if len(flags) < layers or any(f not in (0, 1) or isinstance(f, float) for f in flags[:layers]):
        raise unsupported("no_rope_layers", flags, f"a 0 (NoPE) or 1 (rope) for each of the num_hidden_layers={layers} "
                                                   f"layers")
    nope = tuple(i for i in range(layers) if not flags[i])
    chunk = getattr(hf, "attention_chunk_size", None)
    chunked = tuple(i for i, t in enumerate(attention_types) if t == "chunked_attention")
    if chunked and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise unsupported("attention_chunk_size", chunk, "a positive integer: layer_types names chunked_attention "
                                                         "layers")
    tuning = None
    if bool(getattr(hf, "attn_temperature_tuning", False)):
        floor_scale, attn_scale = getattr(hf, "floor_scale", None), getattr(hf, "attn_scale", None)
        for name, v in (("floor_scale", floor_scale), ("attn_scale", attn_scale)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (name == "floor_scale" and v <= 0):
                raise unsupported(name, v, "a number > 0" if name == "floor_scale" else "a number")
        tuning = (float(floor_scale), float(attn_scale))  # (both checked numbers above)
    qk_norm = bool(getattr(hf, "use_qk_norm", False))
    bias = bool(getattr(hf, "attention_bias", False))
    r = rope_config(rope, c, c["head_dim"], style="interleaved")

    def layer(i: int):
        rotates = i not in nope
        return gqa(c, r, qkv_bias=bias, o_bias=bias, nope_layers=nope,
                   qk_norm="l2" if qk_norm and rotates else None,
                   attention_chunk_size=chunk if i in chunked else None,
                   temperature_tuning=tuning if not rotates else None)

    per_layer = tuple(layer(i) for i in range(layers))
    E = int(hf.num_local_experts)
    sparse = tuple(sorted(int(i) for i in (getattr(hf, "moe_layers", None) or ())))
    if E < 1 or not sparse or any(not 0 <= i < layers for i in sparse):
        raise unsupported("moe_layers", list(sparse), f"layer indices below num_hidden_layers={layers}, at least one "
                                                      f"(num_local_experts={E} > 0)")
    inter, dense = int(hf.intermediate_size), int(getattr(hf, "intermediate_size_mlp", 0) or 0)
    if len(sparse) < layers and not 0 < dense <= MAX_WIDTH:
        raise unsupported("intermediate_size_mlp", dense, f"an integer in [1, {MAX_WIDTH}] (moe_layers leaves dense "
                                                          f"layers)")
    router = RouterConfig(E, c["top_k"], "sigmoid", "topk_sigmoid", norm_topk_prob=False)
    moe = MoEConfig(router, n_shared_experts=1, shared_expert_intermediate_size=inter, router_weight_on_input=True)
    return dict(num_experts=E, moe_intermediate_size=inter, intermediate_size=dense, norm_topk_prob=False,
                sparse_layers=sparse, moe=moe, attention=per_layer[0], layer_attention=per_layer)


__all__ = ["read", "read_config"]
