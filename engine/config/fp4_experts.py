"""Routed experts published as packed FP4 beside FP8 block-scaled linears: config.json's `expert_dtype: "fp4"`
(top level, or inside `quantization_config`; DeepSeek-V4-Flash / V4-Pro publish it, engine/models/deepseek_v4/
reader.py reads and checks the whole format). Each expert projection's `weight` is e2m1 packed two values a byte
along K, with a `.scale` beside it in float8_e8m0fnu, one per 32 values (MXFP4's encoding, one tensor per expert:
moe/expert_weights_mxfp4_split.py holds them packed).

What the checks before the model is built need of it, the family aside: the checkpoint headers (an integer
`.weight` is such an expert, not a cast waiting to happen) and tensor parallelism (packed experts do not split by
intermediate size).
"""
from __future__ import annotations

# safetensors header dtypes of packed e2m1 bytes (DeepSeek's files: int8; torch's float4_e2m1fn_x2 is F4)
FP4_HEADER_DTYPES = ("I8", "U8", "F4")


def published_expert_dtype(hf) -> str | None:
    """config.json's `expert_dtype` ("fp4", "fp8"): inside quantization_config where it is there (V4.1), else at the
    top level (V4); None where neither says. `hf`: transformers' config, or its to_dict() (ModelConfig.hf_config)."""
    get = hf.get if isinstance(hf, dict) else (lambda k, d=None: getattr(hf, k, d))
    raw = get("quantization_config")
    raw = raw if isinstance(raw, dict) else (raw.to_dict() if hasattr(raw, "to_dict") else {})
    return raw.get("expert_dtype", get("expert_dtype"))


def packed_fp4_expert(name: str, dtype, tensors, hf) -> bool:
    """Whether checkpoint tensor `name` (header dtype `dtype`) is a packed FP4 expert weight: packed bytes with a
    `.scale` beside it, in a checkpoint whose config.json says expert_dtype "fp4" (engine/config/checkpoint_headers.py
    lets it through; every other integer `.weight` is refused there)."""
    if dtype not in FP4_HEADER_DTYPES or name[: -len("weight")] + "scale" not in tensors or not isinstance(hf, dict):
        return False
    q = hf.get("quantization_config")
    return (q.get("expert_dtype") if isinstance(q, dict) else None) == "fp4" or hf.get("expert_dtype") == "fp4"


__all__ = ["FP4_HEADER_DTYPES", "packed_fp4_expert", "published_expert_dtype"]
