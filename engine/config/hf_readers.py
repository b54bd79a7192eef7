"""config.json → ModelConfig's fields: the fields every family shares, then the family's own reader
(engine/models/<family>/reader.py, one per family of engine/config/families.py), from the config object
transformers built.

transformers owns the file's aliases and defaults (engine/config/model.py reads it through AutoConfig); a reader
maps that object onto moelink's fields, picks the layer kinds (attention kind, rope, MoE layout) and refuses,
with one sentence naming the field, any value moelink cannot run.
"""
from __future__ import annotations

import importlib
from typing import Callable

from .architectures import MLA_ARCHITECTURES  # noqa: F401  (latent attention, ArchSpec.latent_attention)
from .architectures import REGISTRY
from .families import FAMILIES, family_module
from .quantization import check_architecture, read_quantization
from ..models.rope_config import ROPE_TYPES
from .refusals import unsupported
from .reader_parts import LAYER_TYPES

_ROPE_FIELD = "rope_parameters.rope_type (rope_scaling.rope_type or rope_scaling.type in older files)"

# Each family's reader, by architecture: `read(arch, hf, common fields, rope parameters) -> its fields`.
READERS: dict[str, Callable[[str, object, dict, dict], dict]] = {}
for _family in FAMILIES:
    _config = importlib.import_module(family_module(_family, "config"))
    _read = importlib.import_module(family_module(_family, "reader")).read
    READERS.update({a.name: _read for a in _config.ARCHITECTURES})


def read_fields(arch: str, hf) -> dict:
    """ModelConfig's fields (all but model, dtype, architecture, max_model_len, hf_config) from `hf`."""
    # Quantized weights carry their scales (engine/config/quantization.py reads every quant_method moelink runs and
    # refuses the rest); a format's reader plugs in there, not here. MXFP4 is gpt-oss's experts only.
    if hasattr(type(hf), "allow_global_per_layer_attribute_access"):
        # transformers' heterogeneous configs (Gemma 4's per_layer_config) refuse a per-layer field read globally;
        # the common fields are the model-wide values, and the family's reader reads each layer's own.
        hf.allow_global_per_layer_attribute_access = True
    quantization = read_quantization(getattr(hf, "quantization_config", None))
    check_architecture(quantization, arch)
    hidden_act = getattr(hf, "hidden_act", "silu")
    # gpt-oss's experts run their clamped SwiGLU whatever hidden_act says (transformers never reads it there).
    acts = REGISTRY[arch].hidden_acts if arch in REGISTRY else ("silu",)
    if hidden_act not in acts and arch != "GptOssForCausalLM":
        raise unsupported("hidden_act", hidden_act, acts, " (moelink's MLPs are SiLU-gated)" if acts == ("silu",)
                          else f" for {arch}")
    rope = _rope_parameters(hf, ROPE_TYPES + (REGISTRY[arch].rope_types if arch in REGISTRY else ()))
    num_layers, num_heads = int(hf.num_hidden_layers), int(hf.num_attention_heads)
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)
    eos = getattr(hf, "eos_token_id", None)
    common = dict(
        vocab_size=int(hf.vocab_size), hidden_size=int(hf.hidden_size), num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or num_heads),
        head_dim=int(getattr(hf, "head_dim", None) or hf.hidden_size // num_heads),
        # null where the family norms otherwise (Cohere2-MoE's LayerNorms: its reader sets its layer_norm_eps)
        rms_norm_eps=float(_or(getattr(hf, "rms_norm_eps", None), 1e-6)),
        rope_theta=float(theta) if isinstance(theta, (int, float)) else 10000.0,  # a reader sets a by-kind model's
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 4096)),
        # A family whose config names it elsewhere, or per layer, sets its own (DBRX's ffn_config.moe_top_k,
        # HunYuan-MoE-V1's moe_topk list); 0 fails ModelConfig's check.
        top_k=_count(getattr(hf, "num_experts_per_tok", 0)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ()),
        quantization=quantization,
    )
    family = READERS[arch]
    return {**common, **family(arch, hf, common, rope)}



def _count(v) -> int:
    """A count config.json gives as a number (a list or null: 0, for the family's reader to set)."""
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0



def _or(v, default):
    """config.json's value, or `default` where it is absent or null."""
    return default if v is None else v



def _rope_parameters(hf, allowed: tuple[str, ...] = ROPE_TYPES) -> dict:
    """transformers' rope_parameters (it rewrites the older rope_scaling / rope_theta into them), checked. A
    model with one rope per layer kind keeps them by kind ({"full_attention": {...}, "sliding_attention": {...}},
    MiMo-V2-Flash): each is checked, and the dict is returned by kind."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if rope and all(k in LAYER_TYPES and isinstance(v, dict) for k, v in rope.items()):
        return {kind: _checked_rope(dict(v), f"rope_parameters.{kind}.rope_type", allowed)
                for kind, v in rope.items()}
    return _checked_rope(rope, _ROPE_FIELD, allowed)



def _checked_rope(rope: dict, field_name: str, allowed: tuple[str, ...] = ROPE_TYPES) -> dict:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in allowed:
        raise unsupported(field_name, rope_type, allowed)
    return dict(rope, rope_type=rope_type)



__all__ = ["MLA_ARCHITECTURES", "READERS", "read_fields"]
