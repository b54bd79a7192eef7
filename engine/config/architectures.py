"""The one architecture registry: each `architectures` name of config.json moelink knows, and what it is, gathered
from the model families' own entries (engine/models/<family>/config.py, in engine/config/families.py's order).

Everything that depends on the architecture reads it from here: which names run (engine/config/model.py), the
checkpoint's weight names and the attention kind (engine/models: `ArchSpec`, engine/config/arch_spec.py), MXFP4
experts as published (engine/config/quantization.py). No torch: config reading imports it, and a family's config
module imports none either (tests/test_layering.py). Routing and shapes are config.json facts, read by each family's
reader (engine/config/hf_readers.py), not registry entries.
"""
from __future__ import annotations

import importlib

from .arch_spec import MTP_LAYOUTS, ArchSpec, Architecture
from .families import FAMILIES, family_module

REGISTRY: dict[str, Architecture] = {}
# model_types that published checkpoints carry for an architecture above, and the transformers model_type that
# reads them. Applied whatever the installed transformers registers under the alias (the checkpoint's own
# code, which such files name in auto_map, is never run): a family's MODEL_TYPE_ALIASES (Kimi K2's `kimi_k2` is
# DeepSeek-V3).
MODEL_TYPE_ALIASES: dict[str, str] = {}
# Multimodal checkpoints whose text model is an architecture above: config.json's `text_config` is that model's
# config. Read by ModelConfig.text_model_config. A family's TEXT_MODELS: wrapper -> (text architecture, where the
# text model's "model." tensors live in such a checkpoint; the vision tower's tensors are not read, and a request
# with an image is refused where requests are checked).
TEXT_MODEL_OF: dict[str, str] = {}
TEXT_WEIGHTS_PREFIX: dict[str, str] = {}
# config.json model_type -> the family module whose `read_config(raw, transformers_knows, path)` reads it, for a
# family whose config the locked transformers may lack (DeepSeek-V4.1's, engine/models/deepseek_v41/reader.py).
OWN_CONFIGS: dict[str, str] = {}
for _family in FAMILIES:
    _config = importlib.import_module(family_module(_family, "config"))
    for _arch in _config.ARCHITECTURES:
        if _arch.name in REGISTRY:
            raise ValueError(f"architecture {_arch.name} is registered twice (family {_family}).")
        REGISTRY[_arch.name] = _arch
    MODEL_TYPE_ALIASES.update(getattr(_config, "MODEL_TYPE_ALIASES", {}))
    for _model_type, _part in getattr(_config, "OWN_CONFIGS", {}).items():
        OWN_CONFIGS[_model_type] = family_module(_family, _part)
    for _wrapper, (_text_arch, _prefix) in getattr(_config, "TEXT_MODELS", {}).items():
        TEXT_MODEL_OF[_wrapper] = _text_arch
        TEXT_WEIGHTS_PREFIX[_wrapper] = _prefix

# Views of the registry, by what callers ask.
SUPPORTED_ARCHITECTURES = tuple(n for n, a in REGISTRY.items() if a.runnable)
CONFIG_ONLY_ARCHITECTURES = tuple(n for n, a in REGISTRY.items() if not a.runnable)
MLA_ARCHITECTURES = tuple(n for n, a in REGISTRY.items() if a.runnable and a.spec.latent_attention)
MXFP4_ARCHITECTURES = tuple(n for n, a in REGISTRY.items() if a.mxfp4_experts)
MTP_ARCHITECTURES = tuple(n for n, a in REGISTRY.items() if a.mtp_layers)

__all__ = ["ArchSpec", "Architecture", "MTP_LAYOUTS", "CONFIG_ONLY_ARCHITECTURES", "MLA_ARCHITECTURES", "MODEL_TYPE_ALIASES",
           "MTP_ARCHITECTURES", "MXFP4_ARCHITECTURES", "OWN_CONFIGS", "REGISTRY", "SUPPORTED_ARCHITECTURES", "TEXT_MODEL_OF",
           "TEXT_WEIGHTS_PREFIX"]
