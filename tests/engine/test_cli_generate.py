"""`moelink generate` checks its sampling flags before it reads anything (issue 14): one error naming the flag,
from a directory that has a config but no weights, in well under a second; and a --max-tokens that cannot fit
beside a prompt is refused from config.json and the tokenizer, before the weights load."""
from __future__ import annotations

import shutil
import time

import pytest

from moelink.engine.api.cli import main

BAD_FLAGS = [
    (["--temperature", "-1"], "--temperature=-1.0 is invalid: must be a finite number in [0, 100]"),
    (["--temperature", "nan"], "--temperature=nan is invalid"),
    (["--top-p", "0"], "--top-p=0.0 is invalid: must be a finite number in (0, 1]"),
    (["--top-k", "-5"], "--top-k=-5 is invalid"),
    (["--max-tokens", "0"], "--max-tokens=0 is invalid: must be an integer >= 1"),
    (["--stop", ""], "--stop=[''] is invalid: must be non-empty strings"),
]


@pytest.fixture
def config_only(tiny_model, tmp_path):
    """A model directory with config.json and the tokenizer, and no weights: loading it would fail."""
    src = tiny_model("qwen3_e6k3")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{f}", tmp_path / f)
    return str(tmp_path)


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_bad_sampling_flags_are_refused_before_anything_loads(config_only, capsys, monkeypatch, flags, message):
    import moelink.engine.config.engine_args as engine_args
    import moelink.engine.api.llm as llm

    def must_not_run(*a, **k):
        raise AssertionError("the model was read before the flags were checked")

    monkeypatch.setattr(engine_args.EngineArgs, "create_engine_config", must_not_run)
    monkeypatch.setattr(llm.LLM, "__init__", must_not_run)
    t0 = time.perf_counter()
    assert main(["generate", config_only, "--prompt", "hi", *flags]) == 2
    assert time.perf_counter() - t0 < 1.0
    err = capsys.readouterr().err
    assert err.startswith("moelink: error: ") and message in err and err.count("\n") == 1, err
    assert "SamplingParams" not in err


def test_max_tokens_beyond_the_context_is_refused_before_the_weights_load(config_only, capsys):
    # No safetensors in the directory: reaching the loader would be a different error.
    assert main(["generate", config_only, "--prompt", "hi", "--prompt", "Once upon a time",
                 "--max-tokens", "1022"]) == 2  # "hi" is 2 tokens: it fits
    err = capsys.readouterr().err
    assert "--max-tokens=1022 is too large: this model's maximum context length is 1024 tokens and --prompt #2 " \
           "has" in err, err
    assert "safetensors" not in err
