"""DeepSeek-V4's published weight formats (issue 45): what V4-Flash / V4-Pro's config.json says, read and checked.

What DeepSeek publishes (its config.json, its inference code's `Linear` / `Expert`, and transformers' deepseek_v4,
which moves a top-level `expert_dtype` into `quantization_config`):
- `quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}`: every linear of attention (wq_a, wq_b, wkv, wo_a, wo_b,
  the indexer's wq_b), the shared expert (w1, w2, w3) and the MTP layer's e_proj / h_proj is float8_e4m3fn [N, K]
  with a `.scale` tensor beside `.weight` (not DeepSeek-V3's `weight_scale_inv`): one scale per 128 x 128 block,
  [ceil(N/128), ceil(K/128)], stored as float8_e8m0fnu (ue8m0: a power of two) or float32. The compressors'
  wkv / wgate, the indexer's weights_proj, the router gate, norms, embeddings and the head ship in bf16 without
  a scale (transformers' `_keep_in_fp32_modules` lists the compressor / indexer ones for that reason).
- `expert_dtype: "fp4"` (V4.1 writes it inside quantization_config, V4 at the top level): each routed expert's
  w1 / w3 / w2 is e2m1 packed two values a byte along K, the low nibble the even element ([N, K/2], stored as
  int8 / uint8 or float4_e2m1fn_x2), with `.scale` float8_e8m0fnu [N, K/32]: one power-of-two scale per 32 values
  along K. That is the OCP MXFP4 encoding gpt-oss uses (kernels/mxfp4.py), per expert instead of fused.
  Without `expert_dtype` the experts are FP8 like the other linears (DeepSeek's convert.py `--expert-dtype fp8`).

How moelink runs them (engine/models/deepseek_v4/weights.py): FP4 experts stay packed (moe/expert_weights_dsv4.py, the
MXFP4 W4A16 kernels); attention's FP8 linears and the shared expert's are held FP8 and run W8A8
(engine/models/linear.py's Fp8Linear, each `.scale` read into float32 block scales); the MTP layer's e_proj / h_proj
and FP8 experts are dequantized once at load into the model dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

from .layer_configs import unsupported

EXPERT_DTYPES = ("fp4", "fp8")
SCALE_FORMATS = ("ue8m0", "float32")


@dataclass(frozen=True)
class DSV4Quantization:
    """A V4 checkpoint's published formats: FP8 linears in `block`s (scales stored as `scale_fmt`) and routed
    experts in `expert_dtype` ("fp4": packed e2m1, ue8m0 per 32; "fp8": like the linears)."""

    block: tuple[int, int] = (128, 128)
    expert_dtype: str = "fp4"
    scale_fmt: str = "ue8m0"

    def __post_init__(self) -> None:
        if self.expert_dtype not in EXPERT_DTYPES:
            raise unsupported("quantization_config.expert_dtype", self.expert_dtype, EXPERT_DTYPES,
                              " for DeepSeek-V4 (fp4: e2m1 experts with a ue8m0 scale per 32 values, as V4-Flash / "
                              "V4-Pro publish them; fp8: block-scaled like the linears)")
        if self.scale_fmt not in SCALE_FORMATS:
            raise unsupported("quantization_config.scale_fmt", self.scale_fmt, SCALE_FORMATS)


def read_dsv4_quantization(arch: str, hf, quant) -> DSV4Quantization | None:
    """The V4 formats of config.json (`quant`: engine/config/quantization.read_quantization's result for its
    quantization_config); None for a float checkpoint. Anything but DeepSeek's FP8 block layout (with FP4 or FP8
    experts) is refused naming the field. `hf`: transformers' config, or its to_dict() (ModelConfig.hf_config)."""
    get = hf.get if isinstance(hf, dict) else (lambda k, d=None: getattr(hf, k, d))
    raw = get("quantization_config")
    raw = raw if isinstance(raw, dict) else (raw.to_dict() if hasattr(raw, "to_dict") else {})
    top_expert = get("expert_dtype")
    if quant is None:
        if raw.get("expert_dtype") or top_expert:
            raise ValueError(f"config.json expert_dtype={raw.get('expert_dtype') or top_expert!r} is invalid for "
                             f"{arch} without quantization_config: DeepSeek publishes FP4 experts beside FP8 linears "
                             "(quant_method 'fp8').")
        return None
    if quant.method != "fp8" or getattr(quant, "online", False):
        raise unsupported("quantization_config.quant_method", quant.method, ("fp8",),
                          f" for {arch}: DeepSeek's FP8 block-scaled linears with FP4 (or FP8) experts is the format "
                          "V4-Flash / V4-Pro publish and the one moelink reads")
    if quant.modules_to_not_convert:
        raise ValueError(f"quantization_config.modules_to_not_convert={list(quant.modules_to_not_convert)!r} is not "
                         f"supported for {arch}: which V4 weights are FP8 follows the published files (a `.scale` "
                         "beside a weight); leave it unset.")
    expert = raw.get("expert_dtype", top_expert) or "fp8"
    scale_fmt = raw.get("scale_fmt") or "float32"
    return DSV4Quantization(tuple(quant.block), str(expert), str(scale_fmt))


# safetensors header dtypes of packed e2m1 bytes (DeepSeek's files: int8; torch's float4_e2m1fn_x2 is F4)
FP4_HEADER_DTYPES = ("I8", "U8", "F4")


def dsv4_fp4_expert(name: str, dtype, tensors, hf) -> bool:
    """Whether checkpoint tensor `name` (header dtype `dtype`) is a V4 FP4 expert weight: packed bytes with a `.scale`
    beside it, in a checkpoint whose config.json says expert_dtype "fp4" (engine/config/checkpoint_headers.py lets
    it through; every other integer `.weight` is refused there)."""
    if dtype not in FP4_HEADER_DTYPES or name[: -len("weight")] + "scale" not in tensors or not isinstance(hf, dict):
        return False
    q = hf.get("quantization_config")
    return (q.get("expert_dtype") if isinstance(q, dict) else None) == "fp4" or hf.get("expert_dtype") == "fp4"


__all__ = ["DSV4Quantization", "EXPERT_DTYPES", "dsv4_fp4_expert", "read_dsv4_quantization"]
