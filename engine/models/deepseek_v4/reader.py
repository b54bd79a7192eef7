"""DeepSeek-V4's config.json reader (engine/config/hf_readers.py calls `read`): its layers' attention
(engine/models/compressed_attention_config.py's CompressedAttentionConfig, one per layer), its hyper-connections
(engine/models/hyper_connections_config.py), its MoE facts, and its published weight formats (below). Counted in
engine/config's floor (tests/test_layering.py): no model code, no device.

Its published weight formats (issue 45): what V4-Flash / V4-Pro's config.json says, read and checked.

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

How moelink runs them (weights.py): FP4 experts stay packed (moe/expert_weights_mxfp4_split.py, the
MXFP4 W4A16 kernels); attention's FP8 linears and the shared expert's are held FP8 and run W8A8
(engine/models/linear.py's Fp8Linear, each `.scale` read into float32 block scales); the MTP layer's e_proj / h_proj
and FP8 experts are dequantized once at load into the model dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

from moelink.moe.router_config import RouterConfig

from ..compressed_attention_config import ATTENTION_BOUNDS, LAYER_KINDS, CompressedAttentionConfig, positive_int
from ..hyper_connections_config import HC_BOUNDS, HyperConnectionConfig
from ..rope_config import ROPE_TYPES, RopeConfig
from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported

MLP_KINDS = ("hash_moe", "moe")
SCORING_FUNCS = ("sqrtsoftplus",)
BOUNDS = {**ATTENTION_BOUNDS, **HC_BOUNDS}


def _positive_int(name: str, v) -> None:
    positive_int(name, v, BOUNDS)


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


def _int(hf, name: str) -> int:
    """config.json's `name` as a positive integer (at most BOUNDS[name]), or one error naming it (a null or a
    string is refused here, not left to fail later as a TypeError)."""
    v = getattr(hf, name, None)
    _positive_int(name, v)
    return v


def _compress_rates(hf, layer_types: list) -> dict:
    """compress_rates: a positive integer (at most BOUNDS["compress_rates"]) for each compressed layer kind
    layer_types names."""
    rates = getattr(hf, "compress_rates", None) or {}
    if not isinstance(rates, dict):
        raise unsupported("compress_rates", rates, "an object of one rate per compressed layer type")
    for t in sorted({t for t in layer_types if LAYER_KINDS[t] != "sliding"}):
        _positive_int(f"compress_rates.{t}", rates.get(t))
    return rates


def _rope(hf, label: str, rotary_dim: int) -> RopeConfig:
    """`hf`: transformers' config, or its to_dict() (ModelConfig.hf_config)."""
    params = ((hf.get("rope_parameters") if isinstance(hf, dict) else getattr(hf, "rope_parameters", None))
              or {}).get(label) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise unsupported(f"rope_parameters.{label}.rope_type", rope_type, ROPE_TYPES)
    return RopeConfig(rotary_dim, float(params.get("rope_theta", 10000.0)), rope_type, style="interleaved",
                      layer_type=label)


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """ModelConfig's fields of a `deepseek_v4` config.json (hf_readers.read_fields' family reader)."""
    n = c["num_layers"]
    # V4-Flash / V4-Pro's FP8 block-scaled linears and FP4 experts (read_dsv4_quantization, below); anything else
    # naming quantization_config is refused there.
    read_dsv4_quantization(arch, hf, c.get("quantization"))
    if c["num_kv_heads"] != 1:
        raise unsupported("num_key_value_heads", c["num_kv_heads"], (1,), " (V4's attention is one shared KV head)")
    if getattr(hf, "attention_bias", False):
        raise unsupported("attention_bias", True, (False,), f" for {arch}")
    if getattr(hf, "mlp_bias", False):
        raise unsupported("mlp_bias", True, (False,), f" for {arch}")
    layer_types = list(getattr(hf, "layer_types", None) or ())
    if len(layer_types) != n or any(t not in LAYER_KINDS for t in layer_types):
        raise unsupported("layer_types", layer_types, f"one of {', '.join(map(repr, LAYER_KINDS))} for each of the "
                                                      f"num_hidden_layers={n} layers")
    mlp_types = list(getattr(hf, "mlp_layer_types", None) or ())
    if len(mlp_types) != n or any(t not in MLP_KINDS for t in mlp_types):
        raise unsupported("mlp_layer_types", mlp_types, f"one of {', '.join(map(repr, MLP_KINDS))} per layer")
    scoring = getattr(hf, "scoring_func", "sqrtsoftplus")
    if scoring not in SCORING_FUNCS:
        raise unsupported("scoring_func", scoring, SCORING_FUNCS, f" for {arch}")
    if not getattr(hf, "norm_topk_prob", True):
        raise unsupported("norm_topk_prob", False, (True,), f" (transformers' {arch} always renormalises)")
    head_dim = c["head_dim"]
    rotary_dim = int(getattr(hf, "qk_rope_head_dim", 0) or round(head_dim * float(hf.partial_rotary_factor)))
    rates = _compress_rates(hf, layer_types)
    ropes = {"main": _rope(hf, "main", rotary_dim), "compress": _rope(hf, "compress", rotary_dim)}

    def attention(t: str) -> CompressedAttentionConfig:
        kind = LAYER_KINDS[t]
        csa = kind == "csa"
        return CompressedAttentionConfig(
            kind, c["num_heads"], head_dim, _int(hf, "q_lora_rank"), _int(hf, "o_groups"), _int(hf, "o_lora_rank"),
            _int(hf, "sliding_window"), ropes["main" if kind == "sliding" else "compress"],
            compress_rate=rates[t] if kind != "sliding" else 0,
            index_n_heads=_int(hf, "index_n_heads") if csa else 0, index_head_dim=_int(hf, "index_head_dim") if csa else 0,
            index_topk=_int(hf, "index_topk") if csa else 0, rms_norm_eps=c["rms_norm_eps"])

    layers = tuple(attention(t) for t in layer_types)
    E = _int(hf, "n_routed_experts")
    router = RouterConfig(E, c["top_k"], scoring_func="sqrtsoftplus", topk_method="noaux_tc", norm_topk_prob=True,
                          routed_scaling_factor=float(getattr(hf, "routed_scaling_factor", 1.0) or 1.0))
    limit = float(hf.swiglu_limit)
    if not limit > 0:
        raise unsupported("swiglu_limit", limit, "a number > 0")
    n_shared = int(getattr(hf, "n_shared_experts", 0) or 0)
    if n_shared != 1:
        raise unsupported("n_shared_experts", n_shared, (1,), f" (transformers' {arch} has one shared MLP)")
    moe = MoEConfig(router, n_shared_experts=1, activation="silu_clamp", swiglu_limit=limit)
    hc = HyperConnectionConfig(_int(hf, "hc_mult"), _int(hf, "hc_sinkhorn_iters"), float(hf.hc_eps))
    mtp = getattr(hf, "num_nextn_predict_layers", 0) or 0
    if isinstance(mtp, bool) or not isinstance(mtp, int) or mtp < 0:
        raise unsupported("num_nextn_predict_layers", mtp, "an integer >= 0")
    return dict(num_experts=E, moe_intermediate_size=_int(hf, "moe_intermediate_size"), intermediate_size=0,
                num_nextn_predict_layers=mtp,
                norm_topk_prob=True, sparse_layers=tuple(range(n)), moe=moe, attention=layers[0],
                layer_attention=layers, hash_layers=tuple(i for i, t in enumerate(mlp_types) if t == "hash_moe"),
                hyper_connections=hc)


def mtp_attention(layers: tuple[CompressedAttentionConfig, ...], hf: dict) -> CompressedAttentionConfig:
    """An MTP layer's attention (engine/models/deepseek_v4/mtp.py): sliding only, as DeepSeek publishes it (its
    `compress_ratios` has one entry past the main layers, 0: the MTP layer has no compressor and no indexer, its
    checkpoint no compressor tensors), with the "main" rope; heads, ranks and window are the main layers'."""
    a = layers[0]
    rope = next((x.rope for x in layers if x.rope.layer_type == "main"), None) or _rope(hf, "main", a.rope.rotary_dim)
    return CompressedAttentionConfig("sliding", a.num_heads, a.head_dim, a.q_lora_rank, a.o_groups, a.o_lora_rank,
                               a.sliding_window, rope, rms_norm_eps=a.rms_norm_eps)


__all__ = ["DSV4Quantization", "EXPERT_DTYPES", "mtp_attention", "read", "read_dsv4_quantization"]
