"""What `moelink make-tiny-model` offers: every family moelink serves (`--arch`) in every format moelink reads for it
(`--format`), and how each is written. `moelink make-tiny-model --list` prints these tables.

The arches are the families': each family's package declares its own in `engine/models/<family>/tiny.py` (`ARCHS`, a
name -> TinyArch of engine/tools/tiny_families.py), and ARCHS here gathers them in the registry's order
(engine/config/families.py: FAMILIES), importing each family's tiny module by computed name as the registry imports
its config modules: this module names no family. Three writers:
- tiny_model.py's own (qwen3_moe, mixtral layouts) and tiny_hf_model.py's (deepseek_v3, deepseek_v2, glm4_moe
  layouts), sized by make_tiny_model's arguments: a TinyArch's `sized`;
- a family's presets, built and saved by transformers (a TinyArch's `write`), changed by config fields (`extra`);
- a format (tiny_formats.py, quantize_fp8.py, mxfp4_checkpoint.py, or a family's `own_formats`) rewrites the float
  checkpoint.
"""
from __future__ import annotations

import importlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from ..config.families import FAMILIES, family_module, has_part
from .tiny_families import TinyArch

# Formats every family may offer: name -> what the checkpoint holds (a family's own formats join them: FORMATS).
_GENERIC_FORMATS: dict[str, str] = {
    "float": "every weight in --dtype (float32 by default)",
    "fp8": "DeepSeek's FP8 block-scaled W8A8 layout (weight_scale_inv per 16 x 16 block at these sizes), as "
           "`moelink quantize-fp8` writes it",
    "mxfp4": "gpt-oss's MXFP4 experts (*_blocks / *_scales), as `moelink quantize-mxfp4` writes them",
    "int4": "compressed-tensors pack-quantized W4A16 routed experts (Kimi K2 Thinking's recipe: group 32, symmetric; "
            "--int4-group, --int4-zero-point)",
    "gptq": "the int4 experts' integers in GPTQ's layout (qweight / qzeros / scales / g_idx)",
    "awq": "the int4 experts' integers in AutoAWQ's GEMM layout (zero points)",
    "nvfp4": "ModelOpt's NVFP4 routed experts (e2m1, e4m3 scale per 16 values, a global scale)",
}


def _gather() -> dict[str, TinyArch]:
    """Every family's `ARCHS` (its tiny.py), in FAMILIES order; a family without tiny.py offers none."""
    archs: dict[str, TinyArch] = {}
    for family in FAMILIES:
        if not has_part(family, "tiny"):
            continue
        module = family_module(family, "tiny")
        for name, arch in importlib.import_module(module).ARCHS.items():
            if name in archs:
                raise ValueError(f"make-tiny-model: --arch {name} is declared twice ({module} and an earlier family)")
            if (arch.sized is None) == (arch.write is None):
                raise ValueError(f"make-tiny-model: --arch {name} ({module}) needs one writer: `sized` or `write`")
            unknown = [f for f in arch.formats if f not in _GENERIC_FORMATS and f not in arch.own_formats]
            if unknown:
                raise ValueError(f"make-tiny-model: --arch {name} ({module}) offers unknown formats {unknown}: "
                                 f"{', '.join(_GENERIC_FORMATS)} or its own_formats")
            archs[name] = arch
    return archs


ARCHS: dict[str, TinyArch] = _gather()
# Formats: name -> what the checkpoint holds.
FORMATS: dict[str, str] = {**_GENERIC_FORMATS, **{f: text for a in ARCHS.values()
                                                 for f, (text, _) in a.own_formats.items()}}
# Written by tiny_model.py / tiny_hf_model.py and sized by make_tiny_model's arguments (arch -> the layout: Kimi's
# are a deepseek_v3 with Kimi's config and files); the others are their families' presets.
SIZED = {name: a.sized for name, a in ARCHS.items() if a.sized is not None}
PRESETS = tuple(a for a in ARCHS if a not in SIZED)


def check_arch(arch: str) -> TinyArch:
    """The TinyArch of `arch`; one clear error naming every arch (the families' tiny.py) for another."""
    if arch not in ARCHS:
        raise ValueError(f"make_tiny_model: arch={arch!r} is invalid: must be one of {', '.join(ARCHS)} (each "
                         "family's engine/models/<family>/tiny.py declares its own).")
    return ARCHS[arch]


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
    group; what the family declares for a format (TinyArch.format_fields: MXFP4's and V4's FP4 expert widths a multiple
    of 32, GLM-5's FP8 indexer heads one 16-row block each)."""
    a = ARCHS[arch]
    if fmt in ("int4", "gptq", "awq"):
        return {"hidden_size": max(64, int4_group), a.expert_width: max(32, int4_group)}
    return dict(a.format_fields.get(fmt, {}))


def write_preset(out: Path, arch: str, *, seed: int, dtype: torch.dtype, fmt: str, overrides: Mapping) -> None:
    """The family's preset of `arch` (config fields `overrides` on top) in float, into `out`."""
    write = ARCHS[arch].write
    if write is None:
        raise ValueError(f"make_tiny_model: arch={arch!r} has no preset")
    write(out, seed=seed, dtype=dtype, fmt=fmt, overrides=dict(overrides))


def convert(src: Path, out: Path, arch: str, fmt: str, *, int4_group: int, int4_symmetric: bool,
            fp8_block: tuple[int, int]) -> None:
    """The float checkpoint `src` rewritten into `out` in `fmt` (a family's own format by its converter), then
    wrapped as published where the family says so (TinyArch.wrap: Kimi K2.5's)."""
    from . import tiny_formats

    a = ARCHS[arch]
    target = out
    tmp = None
    if a.wrap is not None:  # the checkpoint in its format first, then wrapped
        tmp = tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.")
        target = Path(tmp.name) / "text"
    try:
        if fmt in a.own_formats:
            a.own_formats[fmt][1](str(src), target)
        elif fmt == "float":
            shutil.copytree(src, target, dirs_exist_ok=True)
        elif fmt == "fp8":
            from .quantize_fp8 import quantize_checkpoint

            quantize_checkpoint(src, target, fp8_block)
        elif fmt == "mxfp4":
            from .mxfp4_checkpoint import quantize_mxfp4_checkpoint

            quantize_mxfp4_checkpoint(src, target)
        elif fmt == "nvfp4":
            tiny_formats.nvfp4_checkpoint(str(src), target)
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
        if a.wrap is not None:
            a.wrap(str(target), out)
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


__all__ = ["ARCHS", "FORMATS", "PRESETS", "SIZED", "TinyArch", "check_arch", "check_format", "convert",
           "default_format", "format_overrides", "listing", "set_model_type", "write_preset"]
