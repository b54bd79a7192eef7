"""Quantized checkpoints: config.json's `quantization_config`, read and validated into one frozen config.

moelink runs FP8 block-scaled weights (`quant_method: fp8`, as DeepSeek-V3/R1, Kimi K2 and Qwen3-FP8 publish
them; kernels/fp8.py has the layout) from a checkpoint that says so, or made at load from a float checkpoint
(`--quantization fp8`, "online": the same weights the `moelink quantize-fp8` tool would write), and MXFP4
routed experts (`quant_method: mxfp4`, as OpenAI publishes gpt-oss; kernels/mxfp4.py has the layout), and NVFP4
routed experts (`quant_method: modelopt` with `quant_algo: NVFP4`, as NVIDIA's ModelOpt exports its FP4
DeepSeek-R1 / Qwen3 releases, in config.json or in the older `hf_quant_config.json` beside it; kernels/nvfp4.py
has the layout), and INT4 routed experts (W4A16, group-wise scales, optional zero points; kernels/int4.py has the
layout): compressed-tensors' `pack-quantized` (`quant_method: compressed-tensors`, as Kimi K2 Thinking / K2.5 and
llm-compressor's W4A16 releases publish them; read with the compressed-tensors library itself), and GPTQ / AWQ
(`quant_method: gptq` / `awq`, 4 bits, no act-order), whose tensors the loader rewrites into that layout. Each
reader of a `quant_method` lives in `_READERS`; a method without one is refused naming the field, the value and what
runs; so is a scheme inside a method moelink does not run (FP8 or NVFP4 in compressed-tensors, 8-bit GPTQ, ...).

Which modules stay float: the router gate, norms, embeddings and lm_head always (as published); any module
that `modules_to_not_convert` (transformers' name) or `ignored_layers` (vLLM / compressed-tensors' name) lists.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .architectures import MXFP4_ARCHITECTURES  # experts in MXFP4 as published (gpt-oss's layout)
from .refusals import unsupported
from .quantization_int4 import Int4Config, _read_awq, _read_compressed_tensors, _read_gptq

# Every quant_method a reader exists for (_READERS).
SUPPORTED_METHODS = ("fp8", "mxfp4", "modelopt", "modelopt_fp4", "compressed-tensors", "gptq", "awq")
_ACTIVATION_SCHEMES = ("dynamic",)
_FP8_FORMATS = ("e4m3", "float8_e4m3fn")
# `quantization=` (EngineArgs, --quantization) values that quantize a float checkpoint at load.
ONLINE_METHODS = ("fp8",)
# Names users try for formats moelink reads as published but does not make at load, and why.
_INT4_WHY = ("INT4 weights are read as published (compressed-tensors pack-quantized, GPTQ, AWQ: leave quantization "
             "unset), not made at load: a 4-bit round-to-nearest of a bf16 checkpoint loses accuracy that GPTQ / AWQ "
             "/ QAT calibration keeps, so quantize offline (llm-compressor's W4A16) and serve that checkpoint; "
             "online, --quantization fp8 is the choice.")
ONLINE_REFUSED = {"int4": _INT4_WHY, "w4a16": _INT4_WHY, "gptq": _INT4_WHY, "awq": _INT4_WHY,
                  "compressed-tensors": _INT4_WHY, "compressed_tensors": _INT4_WHY}


@dataclass(frozen=True)
class Fp8Config:
    """FP8 e4m3 weights with one float32 `weight_scale_inv` per weight_block_size block; activations quantized
    per token per Bk channels at run time (activation_scheme "dynamic": the only one published for blocks).

    online: the checkpoint is float and the loader block-quantizes each weight as it reads it.
    modules_to_not_convert: module names (or name components / prefixes) whose weights stay float.
    """

    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    modules_to_not_convert: tuple[str, ...] = ()
    online: bool = False

    method = "fp8"

    def __post_init__(self) -> None:
        b = self.weight_block_size
        if (not isinstance(b, (list, tuple)) or len(b) != 2
                or any(not isinstance(x, int) or isinstance(x, bool) or x <= 0 for x in b)):
            raise ValueError(f"quantization_config.weight_block_size={b!r} is invalid: two positive integers "
                             f"[Bn, Bk] (every published FP8 checkpoint has [128, 128]).")
        object.__setattr__(self, "weight_block_size", (int(b[0]), int(b[1])))
        if self.activation_scheme not in _ACTIVATION_SCHEMES:
            raise unsupported("quantization_config.activation_scheme", self.activation_scheme, _ACTIVATION_SCHEMES,
                              " (activations are quantized per token per 128-channel group at run time)")
        object.__setattr__(self, "modules_to_not_convert", tuple(self.modules_to_not_convert))

    @property
    def block(self) -> tuple[int, int]:
        return self.weight_block_size

    def is_quantized(self, module: str) -> bool:
        """Whether the module named `module` ("model.layers.3.self_attn.q_proj") holds FP8 weights. An entry
        of modules_to_not_convert matches the whole name, a dotted prefix of it, or a run of its components
        ("lm_head", "model.layers.0", "self_attn"), as transformers and vLLM match them."""
        name = f".{module}."
        return not any(f".{m.strip('.')}." in name for m in self.modules_to_not_convert)


def _skip_pattern(entry: str) -> re.Pattern:
    """modules_to_not_convert entry -> a regex matching it as a run of whole name components, `*` standing for
    one component (gpt-oss lists "model.layers.*.self_attn")."""
    parts = [r"[^.]+" if c == "*" else re.escape(c) for c in entry.strip(".").split(".")]
    return re.compile(r"(^|\.)" + r"\.".join(parts) + r"(\.|$)")


@dataclass(frozen=True)
class Mxfp4Config:
    """MXFP4 routed experts (OCP MX: e2m1 values, one E8M0 scale per 32 along the reduction dim; activations
    stay in the model dtype, W4A16) as gpt-oss publishes them: only `mlp.experts` is ever MXFP4 (everything
    else, attention and router included, is float in the checkpoint whatever the list says).

    modules_to_not_convert: module names, dotted prefixes or runs of components, `*` matching one component.
    ignore: compressed-tensors' list (Kimi K3's `mxfp4-pack-quantized`): module names or `re:` and a regular
    expression matched from the name's start; a listed experts module is float.
    """

    modules_to_not_convert: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    method = "mxfp4"
    online = False  # MXFP4 is read as published; nothing quantizes it at load

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules_to_not_convert", tuple(self.modules_to_not_convert))

    def is_quantized(self, module: str) -> bool:
        """Whether `module` ("model.layers.3.mlp.experts") holds MXFP4 weights: a routed-experts module not
        listed in modules_to_not_convert. Linears are never MXFP4 (engine/models/linear.py runs them float)."""
        if module.rsplit(".", 1)[-1] != "experts":
            return False
        if any(re.match(e[3:], module) if e.startswith("re:") else e == module for e in self.ignore):
            return False
        return not any(_skip_pattern(m).search(module) for m in self.modules_to_not_convert)


@dataclass(frozen=True)
class Nvfp4Config:
    """NVFP4 routed experts as ModelOpt exports them (e2m1 values, one e4m3 scale per `group_size` = 16 along the
    reduction dim, a float32 per-tensor weight_scale_2; kernels/nvfp4.py), run W4A16: activations stay in the model
    dtype and the checkpoint's input_scale (for W4A4) is loaded but not applied.

    ignore: module name patterns that stay float (config.json's `ignore`, hf_quant_config.json's
    `exclude_modules`): `*` matches any run of characters, dots included ("model.layers.*.self_attn*"), and a
    pattern without one matches a module's name or a dotted prefix of it ("lm_head", "model.layers.3").
    kv_cache_quant_algo: recorded only (the KV cache dtype is the engine's --kv-cache-dtype).
    """

    group_size: int = 16
    ignore: tuple[str, ...] = ()
    kv_cache_quant_algo: str | None = None

    method = "nvfp4"
    online = False  # read as published; nothing quantizes to NVFP4 at load

    def __post_init__(self) -> None:
        if self.group_size != 16:
            raise unsupported("quantization_config.group_size", self.group_size, (16,),
                              " (NVFP4 has one e4m3 scale per 16 values)")
        object.__setattr__(self, "ignore", tuple(self.ignore))

    def _ignored(self, module: str) -> bool:
        for pat in self.ignore:
            p = pat.strip(".")
            if "*" in p or "?" in p:
                if fnmatch.fnmatchcase(module, p):
                    return True
            elif module == p or module.startswith(p + "."):
                return True
        return False

    def is_quantized(self, module: str) -> bool:
        """Whether `module` ("model.layers.3.mlp.experts") runs NVFP4: a routed-experts module not ignored. Every
        other module runs float (engine/models/linear.py); where the checkpoint holds one in NVFP4 anyway (ModelOpt
        quantizes shared experts, dense MLPs and often attention unless told not to), it is dequantized at load
        (engine/rank/nvfp4_linears.py)."""
        return module.rsplit(".", 1)[-1] == "experts" and not self._ignored(module)


QuantConfig = Fp8Config | Mxfp4Config | Nvfp4Config | Int4Config  # the formats moelink reads


def read_quantization(quant: Any) -> QuantConfig | None:
    """The checkpoint's quantization, from config.json's `quantization_config` (a dict, or the object
    transformers made of it); None for an unquantized checkpoint."""
    if not quant:
        return None
    if not isinstance(quant, Mapping):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else vars(quant)
    method = quant.get("quant_method")
    reader = _READERS.get(method)
    if reader is None:
        raise unsupported("quantization_config.quant_method", method, SUPPORTED_METHODS,
                          " (fp8: block-scaled e4m3 weights as DeepSeek-V3 / Qwen3-FP8 publish them; mxfp4: "
                          "gpt-oss's experts; modelopt: NVFP4 experts; compressed-tensors / gptq / awq: INT4 W4A16 "
                          "experts; other formats: convert the checkpoint to bf16 first)")
    return reader(quant)


def _read_fp8(quant: Mapping) -> Fp8Config:
    fmt = quant.get("fmt", "e4m3")
    if fmt not in _FP8_FORMATS:
        raise unsupported("quantization_config.fmt", fmt, ("e4m3",), " (float8_e4m3fn weights)")
    block = quant.get("weight_block_size")
    if block is None:
        # Per-tensor FP8 (one scale per weight) is another layout: refused rather than read as blocks.
        raise ValueError("quantization_config.weight_block_size is missing: moelink runs block-scaled FP8 "
                         "(two positive integers, e.g. [128, 128]); per-tensor FP8 checkpoints are not supported.")
    skip = _read_skip_list(quant)
    return Fp8Config(tuple(block) if isinstance(block, (list, tuple)) else block,
                     quant.get("activation_scheme", "dynamic"), skip)


def _read_skip_list(quant: Mapping) -> tuple[str, ...]:
    skip = tuple(quant.get("modules_to_not_convert") or ()) + tuple(quant.get("ignored_layers") or ())
    if any(not isinstance(m, str) for m in skip):
        raise ValueError(f"quantization_config.modules_to_not_convert={list(skip)!r} is invalid: a list of "
                         f"module names.")
    return skip


def _read_mxfp4(quant: Mapping) -> Mxfp4Config:
    return Mxfp4Config(_read_skip_list(quant))


def check_architecture(quant: QuantConfig | None, arch: str) -> None:
    """Refuse a quantization the architecture's weights cannot be in (MXFP4 is gpt-oss's experts only)."""
    if quant is not None and quant.method == "mxfp4" and arch not in MXFP4_ARCHITECTURES:
        raise ValueError(f"config.json quantization_config.quant_method='mxfp4' is not supported for {arch}: "
                         f"MXFP4 experts run for {', '.join(MXFP4_ARCHITECTURES)} only (gpt-oss's and Kimi K3's "
                         f"published layouts); use a bf16 or fp8 checkpoint of this model.")


def _read_modelopt(quant: Mapping) -> Nvfp4Config:
    """ModelOpt's two spellings: config.json's flat `{"quant_method": "modelopt", "quant_algo", "group_size",
    "ignore", "kv_cache_quant_algo"}` (group_size possibly under config_groups.*.weights), and the
    hf_quant_config.json section `{"quantization": {"quant_algo", "group_size", "exclude_modules"}}`."""
    nested = quant.get("quantization")
    q = nested if isinstance(nested, Mapping) and "quant_algo" not in quant else quant
    where = "hf_quant_config.json quantization" if q is nested else "config.json quantization_config"
    algo = q.get("quant_algo")
    if not isinstance(algo, str) or algo.upper() != "NVFP4":
        raise ValueError(f"{where}.quant_algo={algo!r} is not supported (moelink runs ModelOpt's NVFP4 experts; its "
                         f"FP8, W4A8 and mixed-precision exports are not): allowed: 'NVFP4'.")
    group = q.get("group_size")
    if group is None:
        groups = [g.get("weights", {}).get("group_size") for g in (q.get("config_groups") or {}).values()
                  if isinstance(g, Mapping) and isinstance(g.get("weights"), Mapping)]
        group = next((g for g in groups if g is not None), 16)
    if isinstance(group, bool) or str(group) != "16":
        raise ValueError(f"{where}.group_size={group!r} is not supported (NVFP4 has one e4m3 scale per 16 values): "
                         f"allowed: 16.")
    skip = tuple(q.get("ignore") or ()) + tuple(q.get("exclude_modules") or ())
    if any(not isinstance(m, str) for m in skip):
        raise ValueError(f"{where}.ignore={list(skip)!r} is invalid: a list of module name patterns.")
    return Nvfp4Config(int(group), skip, q.get("kv_cache_quant_algo"))




def read_hf_quant_config(model_dir: str | Path) -> dict | None:
    """The `hf_quant_config.json` ModelOpt writes beside an older checkpoint's config.json (which then has no
    quantization_config), as a quantization_config dict for `read_quantization`; None without the file."""
    path = Path(model_dir) / "hf_quant_config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"model={str(model_dir)!r}: hf_quant_config.json is not valid JSON ({e}).") from None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("quantization"), Mapping):
        raise ValueError(f"model={str(model_dir)!r}: hf_quant_config.json has no 'quantization' section (ModelOpt "
                         f"writes {{'quantization': {{'quant_algo': 'NVFP4', ...}}}}).")
    return {"quant_method": "modelopt", "quantization": dict(raw["quantization"])}


def _read_compressed(quant: Mapping) -> QuantConfig:
    """compressed-tensors: its MXFP4 experts (`mxfp4-pack-quantized`, as Moonshot publishes Kimi K3: per expert
    `weight_packed` uint8 [N, K/2] and `weight_scale` E8M0 uint8 [N, K/32], group 32) or its INT4 W4A16 layout."""
    if quant.get("format") != "mxfp4-pack-quantized":
        return _read_compressed_tensors(quant)
    from compressed_tensors.quantization import QuantizationConfig

    try:
        qc = QuantizationConfig.model_validate(dict(quant))
    except Exception as e:  # noqa: BLE001  (pydantic's ValidationError and the library's ValueErrors)
        raise ValueError(f"config.json quantization_config is not a valid compressed-tensors config: {e}") from None
    for name, group in qc.config_groups.items():
        w = getattr(group, "weights", None)
        scheme = None if w is None else (str(w.type), w.num_bits, str(w.strategy), w.group_size, bool(w.dynamic))
        if scheme != ("float", 4, "group", 32, False) or group.input_activations is not None:
            raise unsupported(f"quantization_config.config_groups.{name}.weights", scheme,
                              ("('float', 4, 'group', 32, False)",), " (MXFP4: static e2m1 weights, one E8M0 scale "
                              "per 32, activations in the model dtype)")
    for entry in qc.ignore or ():
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as e:
                raise unsupported("quantization_config.ignore", entry, "names or 're:' and a Python regular "
                                  "expression", f" (its pattern does not compile: {e})") from None
    return Mxfp4Config(ignore=tuple(qc.ignore or ()))


# ("modelopt_fp4": vLLM's name for the same format, which some exports write as their quant_method)
_READERS = {"fp8": _read_fp8, "mxfp4": _read_mxfp4, "modelopt": _read_modelopt, "modelopt_fp4": _read_modelopt,
            "compressed-tensors": _read_compressed, "gptq": _read_gptq, "awq": _read_awq}


def resolve_quantization(checkpoint: QuantConfig | None, requested: str | None,
                         block: tuple[int, int] | None = None) -> QuantConfig | None:
    """The quantization the engine runs: the checkpoint's own, or `requested` (EngineArgs.quantization) made
    at load from a float checkpoint in `block`s (default 128 x 128, as published). Asking for another format
    than the checkpoint's is refused."""
    if requested is None:
        if block is not None:
            raise ValueError(f"fp8_block_size={list(block)!r} is invalid without quantization='fp8': it is the "
                             f"block of weights quantized at load.")
        return checkpoint
    if requested in ONLINE_REFUSED:
        raise ValueError(f"quantization={requested!r} is invalid: {ONLINE_REFUSED[requested]}")
    if requested not in ONLINE_METHODS:
        raise ValueError(f"quantization={requested!r} is invalid: choose from {', '.join(ONLINE_METHODS)} or None "
                         f"(None runs the checkpoint as published).")
    if checkpoint is not None:
        if checkpoint.method != requested:
            raise ValueError(f"quantization={requested!r} is invalid for this checkpoint: it is already quantized "
                             f"with {checkpoint.method!r} (leave quantization unset).")
        if block is not None and tuple(block) != checkpoint.block:
            raise ValueError(f"fp8_block_size={list(block)!r} is invalid for this checkpoint: its weights are "
                             f"already quantized in {list(checkpoint.block)} blocks (leave it unset).")
        return checkpoint
    if block is None:
        return Fp8Config(online=True)
    if not isinstance(block, (list, tuple)) or len(block) != 2 or any(
            not isinstance(b, int) or isinstance(b, bool) or b <= 0 for b in block):
        raise ValueError(f"fp8_block_size={block!r} is invalid: two positive integers [Bn, Bk] (default [128, 128]).")
    return Fp8Config(tuple(block), online=True)


def quantization_config_dict(cfg: Fp8Config) -> dict:
    """config.json's `quantization_config` for `cfg`, in the published layout."""
    out = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": cfg.activation_scheme,
           "weight_block_size": list(cfg.weight_block_size)}
    if cfg.modules_to_not_convert:
        out["modules_to_not_convert"] = list(cfg.modules_to_not_convert)
    return out
