"""What `moelink make-tiny-model` offers: every family moelink serves (`--arch`) in every format moelink reads for it
(`--format`), and how each is written. `moelink make-tiny-model --list` prints these tables.

Three writers:
- tiny_model.py's own (qwen3_moe, mixtral) and tiny_hf_model.py's (deepseek_v3, deepseek_v2, glm4_moe; kimi_k2 and
  kimi_k25 on deepseek_v3), sized by make_tiny_model's arguments;
- the test suite's presets, built and saved by transformers (tiny_families.py: deepseek_v32, glm_moe_dsa,
  qwen3_next, qwen3_5_moe, minimax_m2, mimo_v2_flash, gpt_oss, deepseek_v4), changed by config fields (`extra`);
- a format (tiny_formats.py, quantize_fp8.py, mxfp4_checkpoint.py) rewrites the float checkpoint.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch


@dataclass(frozen=True)
class TinyArch:
    """One `--arch`: the `architectures` its config.json names, the published checkpoints it stands for, and the
    formats moelink reads it in (the first is the default)."""

    architecture: str
    covers: str
    formats: tuple[str, ...]


# Formats: name -> what the checkpoint holds.
FORMATS: dict[str, str] = {
    "float": "every weight in --dtype (float32 by default)",
    "fp8": "DeepSeek's FP8 block-scaled W8A8 layout (weight_scale_inv per 16 x 16 block at these sizes), as "
           "`moelink quantize-fp8` writes it",
    "mxfp4": "gpt-oss's MXFP4 experts (*_blocks / *_scales), as `moelink quantize-mxfp4` writes them",
    "int4": "compressed-tensors pack-quantized W4A16 routed experts (Kimi K2 Thinking's recipe: group 32, symmetric; "
            "--int4-group, --int4-zero-point)",
    "gptq": "the int4 experts' integers in GPTQ's layout (qweight / qzeros / scales / g_idx)",
    "awq": "the int4 experts' integers in AutoAWQ's GEMM layout (zero points)",
    "nvfp4": "ModelOpt's NVFP4 routed experts (e2m1, e4m3 scale per 16 values, a global scale)",
    "published": "DeepSeek-V4 as DeepSeek publishes it: FP8 linears with ue8m0 block scales, FP4 routed experts, "
                 "DeepSeek's tensor names",
}

_QUANT = ("fp8", "int4", "gptq", "awq", "nvfp4")
ARCHS: dict[str, TinyArch] = {
    "qwen3_moe": TinyArch("Qwen3MoeForCausalLM", "Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder MoE",
                          ("float",) + _QUANT),
    "mixtral": TinyArch("MixtralForCausalLM", "Mixtral-8x7B, Mixtral-8x22B", ("float",) + _QUANT),
    "deepseek_v3": TinyArch("DeepseekV3ForCausalLM", "DeepSeek-V3, DeepSeek-R1", ("float",) + _QUANT),
    "deepseek_v2": TinyArch("DeepseekV2ForCausalLM", "DeepSeek-V2, DeepSeek-V2-Lite", ("float",) + _QUANT),
    "glm4_moe": TinyArch("Glm4MoeForCausalLM", "GLM-4.5, GLM-4.5-Air, GLM-4.6", ("float",) + _QUANT),
    "kimi_k2": TinyArch("DeepseekV3ForCausalLM", "Kimi K2, K2 Thinking (model_type kimi_k2; INT4 experts as K2 "
                        "Thinking publishes them, FP8 as K2)", ("int4", "float", "fp8")),
    "kimi_k25": TinyArch("KimiK25ForConditionalGeneration", "Kimi K2.5 (its text model under language_model., a "
                         "vision tower's tensors beside it; INT4 experts)", ("int4", "float")),
    "deepseek_v32": TinyArch("DeepseekV32ForCausalLM", "DeepSeek-V3.2 (-Exp)", ("float",) + _QUANT),
    "glm_moe_dsa": TinyArch("GlmMoeDsaForCausalLM", "GLM-5", ("float",) + _QUANT),
    # No fp8: the q / gate split of gated attention moves rows across FP8 blocks, which the loader refuses.
    "qwen3_next": TinyArch("Qwen3NextForCausalLM", "Qwen3-Next-80B-A3B", ("float", "int4", "gptq", "awq", "nvfp4")),
    "qwen3_5_moe": TinyArch("Qwen3_5MoeForConditionalGeneration", "Qwen3.5-MoE (397B-A17B, 122B-A10B, 35B-A3B) as "
                            "published (the text model of a multimodal checkpoint)",
                            ("float", "int4", "gptq", "awq", "nvfp4")),
    "minimax_m2": TinyArch("MiniMaxM2ForCausalLM", "MiniMax-M2, M2.1", ("float",) + _QUANT),
    "mimo_v2_flash": TinyArch("MiMoV2FlashForCausalLM", "MiMo-V2-Flash", ("float",) + _QUANT),
    "gpt_oss": TinyArch("GptOssForCausalLM", "gpt-oss-20b, gpt-oss-120b", ("float", "mxfp4")),
    "deepseek_v4": TinyArch("DeepseekV4ForCausalLM", "DeepSeek-V4 (Flash, Pro)", ("float", "published")),
}
# Written by tiny_model.py / tiny_hf_model.py and sized by make_tiny_model's arguments (kimi_k2 / kimi_k25: a
# deepseek_v3 with Kimi's config and files); the others are tiny_families.py's presets.
SIZED = {"qwen3_moe": "qwen3_moe", "mixtral": "mixtral", "deepseek_v3": "deepseek_v3", "deepseek_v2": "deepseek_v2",
         "glm4_moe": "glm4_moe", "kimi_k2": "deepseek_v3", "kimi_k25": "deepseek_v3"}
PRESETS = tuple(a for a in ARCHS if a not in SIZED)


def default_format(arch: str) -> str:
    return ARCHS[arch].formats[0]


def check_format(arch: str, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"make_tiny_model: format={fmt!r} is invalid: must be one of {', '.join(FORMATS)}.")
    if fmt not in ARCHS[arch].formats:
        raise ValueError(f"make_tiny_model: format={fmt!r} is invalid for arch {arch!r}: moelink reads "
                         f"{arch} in {', '.join(ARCHS[arch].formats)}.")


def format_overrides(arch: str, fmt: str, int4_group: int) -> dict:
    """Config fields a preset needs for `fmt`: INT4's reduction dims (hidden and expert widths) a multiple of the
    group; MXFP4's and V4's FP4 expert widths a multiple of 32 (one scale per 32 values); GLM-5's FP8 indexer heads
    one 16-row block each (the rope de-interleave keeps rows inside their block)."""
    if fmt in ("int4", "gptq", "awq"):
        expert_width = "intermediate_size" if arch == "minimax_m2" else "moe_intermediate_size"
        return {"hidden_size": max(64, int4_group), expert_width: max(32, int4_group)}
    if fmt == "mxfp4":
        return {"intermediate_size": 32}
    if fmt == "published":
        return {"moe_intermediate_size": 32}
    if fmt == "fp8" and arch == "glm_moe_dsa":
        return {"index_head_dim": 16}
    return {}


def write_preset(out: Path, arch: str, *, seed: int, dtype: torch.dtype, fmt: str, overrides: Mapping) -> None:
    """tiny_families' checkpoint of `arch` (config fields `overrides` on top) in float, into `out`."""
    from . import tiny_families as tf

    kw = dict(overrides)
    if arch == "deepseek_v32":
        tf.save_hf_checkpoint(out, "dsv32_fp8" if fmt == "fp8" else "dsv32", seed, dtype, **kw)
    elif arch == "glm_moe_dsa":
        tf.save_hf_checkpoint(out, "glm5", seed, dtype, **kw)
    elif arch in ("qwen3_next", "qwen3_5_moe"):
        tf.save_hf_checkpoint(out, arch, seed, dtype, **kw)
    elif arch in ("minimax_m2", "mimo_v2_flash"):
        tf.save_m2_checkpoint(out, {"minimax_m2": "minimax", "mimo_v2_flash": "mimo"}[arch], seed, dtype, **kw)
    elif arch == "gpt_oss":
        tf.save_gpt_oss(out, dtype, seed, **kw)
    elif arch == "deepseek_v4":
        tf.save_dsv4_checkpoint(out, seed, dtype, **kw)
    else:
        raise ValueError(f"make_tiny_model: arch={arch!r} has no preset")


def convert(src: Path, out: Path, arch: str, fmt: str, *, int4_group: int, int4_symmetric: bool,
            fp8_block: tuple[int, int]) -> None:
    """The float checkpoint `src` rewritten into `out` in `fmt` (kimi_k25: then wrapped as Kimi K2.5 publishes)."""
    from . import tiny_formats

    target = out
    tmp = None
    if arch == "kimi_k25":  # the DeepSeek-V3 checkpoint in its format first, then wrapped
        tmp = tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.")
        target = Path(tmp.name) / "text"
    try:
        if fmt == "float":
            shutil.copytree(src, target, dirs_exist_ok=True)
        elif fmt == "fp8":
            from .quantize_fp8 import quantize_checkpoint

            quantize_checkpoint(src, target, fp8_block)
        elif fmt == "mxfp4":
            from .mxfp4_checkpoint import quantize_mxfp4_checkpoint

            quantize_mxfp4_checkpoint(src, target)
        elif fmt == "nvfp4":
            tiny_formats.nvfp4_checkpoint(str(src), target)
        elif fmt == "published":
            tiny_formats.write_published_dsv4(str(src), target)
        else:
            if int4_group not in tiny_formats.INT4_GROUPS:
                raise ValueError(f"make_tiny_model: int4_group={int4_group!r} is invalid: must be one of "
                                 f"{', '.join(map(str, tiny_formats.INT4_GROUPS))}.")
            if fmt == "awq" and int4_symmetric:
                int4_symmetric = False  # AutoAWQ's GEMM layout always has zero points
            int4_dir = target
            if fmt != "int4":
                int4_dir = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.int4."))
            try:
                tiny_formats.int4_checkpoint(str(src), int4_dir, int4_symmetric, int4_group)
                if fmt == "gptq":
                    tiny_formats.gptq_checkpoint(str(int4_dir), target, int4_symmetric, int4_group)
                elif fmt == "awq":
                    tiny_formats.awq_checkpoint(str(int4_dir), target, int4_symmetric, int4_group)
            finally:
                if int4_dir != target:
                    shutil.rmtree(int4_dir, ignore_errors=True)
        if arch == "kimi_k25":
            tiny_formats.kimi_k25_checkpoint(str(target), out)
    finally:
        if tmp is not None:
            tmp.cleanup()


def set_model_type(out: Path, model_type: str) -> None:
    """config.json's model_type as the publisher writes it (Kimi K2's `kimi_k2`, read by moelink as DeepSeek-V3)."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["model_type"] = model_type
    path.write_text(json.dumps(config, indent=2) + "\n")


def listing() -> str:
    """`make-tiny-model --list`: every arch with its config.json architecture, what it stands for and its formats
    (the default first), then every format."""
    lines = ["arch           architectures (config.json)         formats (default first)        stands for"]
    for name, a in ARCHS.items():
        lines.append(f"{name:<14} {a.architecture:<35} {' '.join(a.formats):<30} {a.covers}")
    lines += ["", "format     what the checkpoint holds"]
    lines += [f"{name:<10} {text}" for name, text in FORMATS.items()]
    return "\n".join(lines)


__all__ = ["ARCHS", "FORMATS", "PRESETS", "SIZED", "TinyArch", "check_format", "convert", "default_format",
           "format_overrides", "listing", "set_model_type", "write_preset"]
