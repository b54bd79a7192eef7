"""The INT4 checkpoints' quantization_config readers (engine/config/quantization.py's Int4Config): compressed-tensors
(validated by the compressed-tensors library itself), GPTQ and AWQ.

What runs (kernels/int4.py): 4-bit integer weights, one scale per group of 32, 64 or 128 values along the reduction
dim, symmetric or with a zero point per group, activations in the model dtype (W4A16). Everything else these methods
can describe is refused here with one sentence naming the field and the scheme: compressed-tensors' other formats
(FP8 `float-quantized`, `nvfp4-pack-quantized`, `naive-quantized` / `int-quantized` W8A8, `marlin-24`, ...),
quantized activations (W4A8, W8A8), channel / block / tensor strategies, other bit widths, activation ordering that
stores a `g_idx` (compressed-tensors `actorder: group`, GPTQ `desc_act: true`: the rows' groups are permuted, which
the kernels' contiguous groups do not express), a KV-cache scheme, weights not yet compressed; AWQ without zero points
or in another kernel layout (gemv, marlin, exllama).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from .refusals import unsupported

_CT = "quantization_config"


def _component_run(entry: str) -> re.Pattern:
    """A modules_to_not_convert entry as a run of whole name components, `*` one component (as quantization.py's
    MXFP4 / FP8 lists match)."""
    parts = [r"[^.]+" if c == "*" else re.escape(c) for c in entry.strip(".").split(".")]
    return re.compile(r"(^|\.)" + r"\.".join(parts) + r"(\.|$)")


# The group sizes the INT4 kernels take (kernels/int4.py GROUP_SIZES; config reading imports no kernel module, and
# tests/engine/test_int4_checkpoint.py holds the two equal).
INT4_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Int4Config:
    """INT4 routed experts run W4A16 (kernels/int4.py): 4-bit integers, one scale per `group_size` values along the
    reduction dim, a zero point per group unless `symmetric`; activations stay in the model dtype.

    layout: the checkpoint's tensors: "compressed-tensors" (`weight_packed` / `weight_scale` / `weight_zero_point`,
    the layout moelink holds), "gptq" (`qweight` [K/8, N], `qzeros`, `scales`, `g_idx`; `gptq_v1`: zero points stored
    minus one, GPTQ's checkpoint_format "gptq") or "awq" (`qweight` [K, N/8] in AWQ's nibble order); the loader
    rewrites the last two (moe/expert_weights.Int4Experts). targets / ignore: compressed-tensors' module names,
    `re:` patterns, or a class name ("Linear": every linear); modules_to_not_convert (GPTQ / AWQ): names or runs of
    components that stay float. Which linears outside the routed experts are INT4 follows their tensors in the files
    (`X.weight_packed` / `X.qweight` instead of `X.weight`): those are dequantized at load
    (engine/rank/int4_linears.py). text_prefix: a multimodal checkpoint's text-model prefix, so names in
    targets / ignore written as the files name the modules ("language_model.model.layers...") match too.
    """

    group_size: int
    symmetric: bool
    layout: str = "compressed-tensors"
    gptq_v1: bool = False
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()
    modules_to_not_convert: tuple[str, ...] = ()
    text_prefix: str = ""

    method = "int4"
    online = False  # read as published; `--quantization` quantizes to FP8 only

    def __post_init__(self) -> None:
        if self.group_size not in INT4_GROUP_SIZES:
            raise unsupported("quantization_config.group_size", self.group_size, INT4_GROUP_SIZES,
                              " (INT4 experts with one scale per group along the reduction dim)")
        if self.layout not in ("compressed-tensors", "gptq", "awq"):
            raise ValueError(f"Int4Config.layout={self.layout!r} is invalid: compressed-tensors, gptq or awq.")
        for f in ("targets", "ignore", "modules_to_not_convert"):
            object.__setattr__(self, f, tuple(getattr(self, f)))

    def _names(self, module: str) -> list[str]:
        names = [module]
        if self.text_prefix and module.startswith("model."):
            names.append(self.text_prefix + module[len("model."):])
        return names

    def _matches(self, name: str, targets: tuple[str, ...], linear: bool) -> bool:
        from compressed_tensors.utils.match import match_name  # the library's own rule: exact name or `re:` match

        return any(match_name(name, t) or (linear and t == "Linear") for t in targets)

    def is_quantized(self, module: str) -> bool:
        """Whether `module` ("model.layers.3.mlp.experts") holds INT4 experts: a routed-experts module whose expert
        linears ("...experts.0.gate_proj") the config targets and does not ignore. Every other module runs float
        (engine/models/linear.py); INT4 tensors of one are dequantized at load (engine/rank/int4_linears.py)."""
        if module.rsplit(".", 1)[-1] != "experts":
            return False
        for name in self._names(module):
            linear = f"{name}.0.gate_proj"
            if self.layout != "compressed-tensors":
                if any(_component_run(m).search(linear) for m in self.modules_to_not_convert):
                    return False
                continue
            if not self._matches(linear, self.targets, True) or self._matches(linear, self.ignore, True) \
                    or self._matches(name, self.ignore, False):
                return False
        return True



# -- the writer's quantizer: what llm-compressor's W4A16 recipe does, through compressed-tensors ------------------
# (engine/tools/tiny_formats.py writes checkpoints with it; engine/rl/requantize.py re-quantizes a trainer's float
# weights with it, so both give the same integers.)

def int4_scheme(symmetric: bool, group: int):
    """compressed-tensors' W4A16 scheme: 4-bit int weights, group strategy, `symmetric` or with zero points."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, group_size=group, strategy="group")
    return QuantizationScheme(targets=["Linear"], weights=args)


def compress_weight(w: torch.Tensor, symmetric: bool = True, group: int = 32, scale_dtype=torch.float32) -> dict:
    """One [N, K] weight through compressed-tensors: qparams per group from its min / max (calculate_qparams), then
    PackedQuantizationCompressor.compress. Scales are rounded to bf16 (Kimi's are bf16) and held in `scale_dtype`:
    float32 by default, so transformers' decompression ((q - z) * s in the scale's dtype: at most 13 significant
    bits) is exact and an oracle sees exactly the weights the checkpoint means; bf16 as Kimi ships them."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = int4_scheme(symmetric, group)
    n, k = w.shape
    if k % group:
        raise ValueError(f"INT4 group {group}: a weight of shape {(n, k)} has K={k}, not a multiple of the group "
                         f"(hidden and expert widths must be multiples of it).")
    g = w.to(torch.float32).reshape(n, k // group, group)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights)
    scale = scale.to(torch.bfloat16).to(scale_dtype)
    state = {"weight": w.to(scale_dtype), "weight_scale": scale, "weight_zero_point": zp}
    return PackedQuantizationCompressor.compress(state, scheme)


def _refuse(field: str, value, allowed, why: str) -> ValueError:
    return unsupported(f"{_CT}.{field}", value, allowed, why)


def _check_patterns(field: str, entries) -> None:
    """compressed-tensors' `re:` entries (targets, ignore) compiled as its matcher compiles them (Python's re), so a
    pattern that does not compile is refused as the config is read, naming it, not raised later as re.error."""
    for entry in entries or ():
        if isinstance(entry, str) and entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as e:
                raise _refuse(field, entry, "module names, class names, or 're:' and a Python regular expression",
                              f" (its pattern does not compile: {e})") from None


def _read_compressed_tensors(quant: Mapping):
    """compressed-tensors' quantization_config, validated by the library (`QuantizationConfig.model_validate`: its
    defaults, the strategy it infers from a group size, its own checks), then the INT4 W4A16 scheme pulled out."""
    from compressed_tensors.quantization import QuantizationConfig

    try:
        qc = QuantizationConfig.model_validate(dict(quant))
    except Exception as e:  # noqa: BLE001  (pydantic's ValidationError and the library's ValueErrors)
        raise ValueError(f"config.json {_CT} is not a valid compressed-tensors config: {e}") from None
    fmt = qc.format
    if fmt != "pack-quantized":
        raise _refuse("format", fmt, ("pack-quantized",),
                      " (moelink reads compressed-tensors' INT4 W4A16 layout, as Kimi K2 Thinking / K2.5 ship it; "
                      "FP8, NVFP4 / MXFP4, W8A8 and sparse formats of compressed-tensors are not read)")
    if str(getattr(qc.quantization_status, "value", qc.quantization_status)) != "compressed":
        raise _refuse("quantization_status", str(getattr(qc.quantization_status, "value", qc.quantization_status)),
                      ("compressed",), " (the weights must be stored packed)")
    if qc.kv_cache_scheme is not None:
        raise _refuse("kv_cache_scheme", qc.kv_cache_scheme.model_dump(mode="json"), (None,),
                      " (a quantized KV cache is the engine's --kv-cache-dtype, not read from the checkpoint)")
    schemes = {}
    for name, group in qc.config_groups.items():
        if not hasattr(group, "weights"):
            continue  # a bare list of targets (an older spelling): no scheme of its own
        schemes[name] = group
    if not schemes:
        raise ValueError(f"config.json {_CT}.config_groups has no scheme with weights: nothing to read as INT4.")
    keys = set()
    targets: list[str] = []
    for name, s in schemes.items():
        w = s.weights
        where = f"config_groups.{name}"
        if s.input_activations is not None or s.output_activations is not None:
            raise _refuse(f"{where}.input_activations", s.input_activations.model_dump(mode="json")
                          if s.input_activations is not None else None, (None,),
                          " (moelink runs INT4 as W4A16: activations stay in the model dtype; W4A8 / W8A8 are not run)")
        if w is None or str(w.type) != "int" or w.num_bits != 4:
            raise _refuse(f"{where}.weights", None if w is None else f"{w.type} {w.num_bits}-bit", ("int 4-bit",),
                          " (the INT4 experts' scheme)")
        if str(w.strategy) != "group":
            raise _refuse(f"{where}.weights.strategy", str(w.strategy), ("group",),
                          " (one scale per group along the reduction dim; channel / block / tensor scales are not run)")
        if w.actorder is not None and str(w.actorder) not in ("weight", "static"):
            raise _refuse(f"{where}.weights.actorder", str(w.actorder), (None, "weight"),
                          " (activation ordering 'group' stores a weight_g_idx that permutes the groups of each row; "
                          "moelink's kernels take contiguous groups)")
        if w.dynamic:
            raise _refuse(f"{where}.weights.dynamic", w.dynamic, (False,), " (static weight scales)")
        keys.add((w.group_size, bool(w.symmetric)))
        _check_patterns(f"{where}.targets", s.targets)
        targets += list(s.targets)
    if len(keys) > 1:
        raise ValueError(f"config.json {_CT}.config_groups mixes INT4 schemes {sorted(keys)} (group size, symmetric): "
                         f"moelink runs one scheme for every INT4 module.")
    group, symmetric = keys.pop()
    _check_patterns("ignore", qc.ignore)
    return Int4Config(int(group), symmetric, "compressed-tensors", targets=tuple(targets),
                      ignore=tuple(qc.ignore or ()))


def _skip(quant: Mapping, field: str) -> tuple[str, ...]:
    skip = quant.get(field) or ()
    if isinstance(skip, str) or any(not isinstance(m, str) for m in skip):
        raise ValueError(f"config.json {_CT}.{field}={skip!r} is invalid: a list of module names.")
    return tuple(skip)


def _bits(quant: Mapping, *fields: str) -> None:
    field = next((f for f in fields if f in quant), fields[0])
    bits = quant.get(field, 4)
    if bits != 4 or isinstance(bits, bool):
        raise _refuse(field, bits, (4,), " (moelink runs 4-bit integer weights: INT4 W4A16)")


def _group(quant: Mapping, *fields: str) -> int:
    field = next((f for f in fields if f in quant), fields[0])
    group = quant.get(field, 128)
    if group == -1:
        raise _refuse(field, group, (32, 64, 128), " (per-channel scales, group -1, are not run: one scale per group)")
    if isinstance(group, bool) or not isinstance(group, int):
        raise _refuse(field, group, (32, 64, 128), "")
    return group


def _read_gptq(quant: Mapping):
    """AutoGPTQ / GPTQModel's quantization_config: bits 4, group_size, desc_act false, sym, checkpoint_format."""
    _bits(quant, "bits")
    if quant.get("desc_act"):
        raise _refuse("desc_act", quant.get("desc_act"), (False,),
                      " (GPTQ act-order: each row's groups follow g_idx, a permutation moelink's contiguous-group "
                      "kernels do not take; requantize without desc_act, or use a compressed-tensors W4A16 export)")
    fmt = quant.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise _refuse("checkpoint_format", fmt, ("gptq", "gptq_v2"),
                      " (GPTQ's own packing: qweight [K/8, N], qzeros [K/G, N/8]; Marlin / BitBLAS repacks are not read)")
    sym = quant.get("sym", True)
    return Int4Config(_group(quant, "group_size"), bool(sym), "gptq", gptq_v1=fmt == "gptq",
                      modules_to_not_convert=_skip(quant, "modules_to_not_convert"))


def _read_awq(quant: Mapping):
    """AutoAWQ's quantization_config: bits / w_bit 4, group_size / q_group_size, zero_point true, version gemm."""
    _bits(quant, "bits", "w_bit")
    version = str(quant.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse("version", version, ("gemm",),
                      " (AWQ's GEMM packing: qweight [K, N/8] in AWQ's nibble order; gemv / marlin / exllama repacks "
                      "are not read)")
    if not quant.get("zero_point", True):
        raise _refuse("zero_point", quant.get("zero_point"), (True,), " (AWQ checkpoints carry zero points)")
    return Int4Config(_group(quant, "group_size", "q_group_size"), False, "awq",
                      modules_to_not_convert=_skip(quant, "modules_to_not_convert"))
