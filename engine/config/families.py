"""The model families, one line each: each is a package `engine/models/<family>/` (ARCHITECTURE.md: How to add a
model family) holding its `config.py` (its `Architecture` entries: engine/config/architectures.py gathers them, in
this order, into the one registry), its `reader.py` (its config.json reader: engine/config/hf_readers.py), its
`tiny.py` (its `moelink make-tiny-model` arches and presets: engine/tools/tiny_archs.py), where it adds block
kinds of its own, its `kinds.py` (imported on the models side, engine/models/blocks/registry.py) and, where it
publishes a multimodal wrapper whose images run, its `vision.py` (its VisionSpecs: engine/multimodal/spec.py).

The modules are imported by computed name, so the engine's code names no family; tests/test_layering.py counts a
family's config and reader modules in engine/config's floor, and checks they import no torch and no decoder. No
torch here: config reading imports this.
"""
from __future__ import annotations

import importlib.util

FAMILIES: tuple[str, ...] = ("qwen3_moe", "mixtral", "deepseek", "qwen3_next", "gpt_oss", "minimax_m2", "deepseek_v4",
                             "mimo_v2_flash", "exaone_moe",
                             "longcat_flash", "kimi_linear", "bailing_hybrid", "glm5_next", "hy_v4", "minimax_m3", "qwen4_exp",
                             "kimi_k3", "deepseek_v41", "qwen2_moe", "olmoe", "ernie4_5_moe", "granitemoe", "dbrx",
                             "phimoe", "llama4",
                             "jamba",
                             "gemma4",
                             "hunyuan_v1_moe",
                             "nemotron_h",
                             "dots1",
                             "sarvam_moe",
                             "lfm2_moe", "cohere2_moe",
                             "afmoe",
                             "flex_olmo",
                             "flint",
                             "mellum")


def family_module(family: str, part: str) -> str:
    """The module `part` ("config", "reader", "kinds", "tiny", "vision") of `family`: a package under engine/models/, or a package
    outside the repository named in full (a dotted name, e.g. tests/engine/test_add_a_family.py's)."""
    package = family if "." in family else f"moelink.engine.models.{family}"
    return f"{package}.{part}"


def has_part(family: str, part: str) -> bool:
    """Whether the family has the module `part` (kinds.py, tiny.py and vision.py are optional)."""
    return importlib.util.find_spec(family_module(family, part)) is not None


__all__ = ["FAMILIES", "family_module", "has_part"]
