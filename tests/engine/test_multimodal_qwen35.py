"""Images into Qwen3.5-MoE (issue 59; docs/multimodal.md): refusals where a model cannot take them, then a tiny
random multimodal checkpoint written by transformers, its processor beside it, against transformers'
Qwen3_5MoeForConditionalGeneration.generate in float64."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def text_llm(hf_tiny_model):
    return LLM(hf_tiny_model("qwen3_next"), dtype="float64", num_kv_blocks=32, block_size=16)


@pytest.mark.slow
@pytest.mark.parametrize("prompt, field", [
    ({"prompt": "hello", "multi_modal_data": {"image": object()}}, "prompt['multi_modal_data']"),
    ({"prompt_token_ids": [1, 2], "multi_modal_data": {}}, "prompt['multi_modal_data']"),
    ({"prompt": "hello", "mm_processor_kwargs": {}}, "prompt['mm_processor_kwargs']"),
    ({"prompt": "hello", "cache_salt": "x"}, "prompt['cache_salt']"),
])
def test_a_field_a_text_model_cannot_use_is_refused_naming_it(text_llm, prompt, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        text_llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)
    assert text_llm.generate({"prompt": "hello"}, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs
