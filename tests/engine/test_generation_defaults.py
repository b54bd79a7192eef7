"""The checkpoint's sampling defaults (engine/config/generation_defaults.py; vLLM's --generation-config auto):
`LLM.get_default_sampling_params()` and `LLM.generate` without sampling parameters take generation_config.json's
temperature / top_p / top_k / min_p / repetition_penalty / max_new_tokens; "vllm" takes SamplingParams' own."""
from __future__ import annotations

import json

import pytest

from moelink.engine import LLM, EngineArgs, SamplingParams
from moelink.engine.config.generation_defaults import generation_defaults


def test_the_files_fields_are_read_and_transformers_defaults_are_not(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.0, "max_new_tokens": 64,
         "min_p": "x", "do_sample": True}))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "max_tokens": 64}
    assert generation_defaults(tmp_path, "vllm") == {}
    assert generation_defaults(tmp_path / "missing") == {}
    with pytest.raises(ValueError, match="generation_config"):
        generation_defaults(tmp_path, "folder")


def test_generate_without_sampling_params_takes_the_checkpoints_defaults(monkeypatch):
    """builtin-model's generation_config.json: temperature 0.7, top_p 0.9."""
    llm = LLM("builtin-model", num_kv_blocks=64)
    try:
        defaults = llm.get_default_sampling_params()
        assert (defaults.temperature, defaults.top_p) == (0.7, 0.9)
        seen = []
        add = llm.engine.add_processed

        def spy(req, kind):
            seen.append(req.params)
            return add(req, kind)
        monkeypatch.setattr(llm.engine, "add_processed", spy)
        llm.generate("Hello", use_tqdm=False)
        assert (seen[0].temperature, seen[0].top_p) == (0.7, 0.9)
        llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)  # given parameters are taken as given
        assert (seen[1].temperature, seen[1].top_p) == (1.0, 1.0)
    finally:
        llm.shutdown()


def test_generation_config_vllm_keeps_sampling_params_defaults():
    llm = LLM("builtin-model", num_kv_blocks=64, generation_config="vllm")
    try:
        assert llm.get_default_sampling_params().temperature == 1.0
    finally:
        llm.shutdown()


def test_a_bad_generation_config_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="generation_config"):
        EngineArgs(model="builtin-model", generation_config="./somewhere").create_engine_config()
