"""A checkpoint's sampling defaults from its generation_config.json, as vLLM takes them (`--generation-config auto`,
its default): the fields a request leaves out are the checkpoint's where it sets them.

vLLM reads `repetition_penalty`, `temperature`, `top_k`, `top_p`, `min_p` and `max_new_tokens` (its `max_tokens`)
from the file, those it sets to other than transformers' own defaults (GenerationConfig.to_diff_dict); `vllm`
ignores the file (SamplingParams' defaults). `LLM.get_default_sampling_params()` and `LLM.generate` without
sampling parameters take them, and so does `/v1/completions` for the fields a body leaves out (its `max_tokens`
excepted: 16, as vLLM's completions route).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GENERATION_CONFIGS = ("auto", "vllm")
# generation_config.json key -> SamplingParams field (vLLM's model_config.get_diff_sampling_param).
KEYS = {"repetition_penalty": "repetition_penalty", "temperature": "temperature", "top_k": "top_k",
        "top_p": "top_p", "min_p": "min_p", "max_new_tokens": "max_tokens"}
# transformers' GenerationConfig defaults: a file that writes them sets nothing (to_diff_dict leaves them out).
_TRANSFORMERS_DEFAULTS = {"repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None,
                          "max_new_tokens": None}


def check_generation_config(value: Any) -> str:
    if value not in GENERATION_CONFIGS:
        raise ValueError(f"generation_config={value!r} is invalid: choose from {', '.join(map(repr, GENERATION_CONFIGS))} "
                         "(auto: the checkpoint's generation_config.json; vllm: SamplingParams' own defaults).")
    return value


def generation_defaults(model_dir: str | Path, mode: str = "auto") -> dict[str, Any]:
    """The SamplingParams fields the checkpoint's generation_config.json sets (empty for `vllm`, or no file). Read
    as JSON (no transformers import on the request path); a value of the wrong kind is left out, logged."""
    if check_generation_config(mode) == "vllm":
        return {}
    path = Path(model_dir) / "generation_config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for key, field in KEYS.items():
        value = data.get(key)
        if value is None or value == _TRANSFORMERS_DEFAULTS[key] or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)) or (key in ("top_k", "max_new_tokens") and not isinstance(value, int)):
            logger.warning("generation_config.json %s=%r is not a number: left out of the sampling defaults", key, value)
            continue
        out[field] = value
    return out


__all__ = ["GENERATION_CONFIGS", "KEYS", "check_generation_config", "generation_defaults"]
