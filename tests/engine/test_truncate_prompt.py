"""`SamplingParams.truncate_prompt_tokens` in the Python API (issue 27, item 9), as the VllmEngine service took it
already: the prompt's last k tokens are kept; -1 keeps as many as fit beside max_tokens. One rule for both
(engine/input_processing.kept_prompt_tokens)."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams

MAX_LEN = 64


@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=64, max_model_len=MAX_LEN) as llm:
        yield llm


def test_the_last_tokens_are_kept(llm):
    ids = list(range(5, 45))
    greedy = dict(temperature=0, max_tokens=6, ignore_eos=True)
    cut = llm.generate([ids], SamplingParams(truncate_prompt_tokens=10, **greedy), use_tqdm=False)[0]
    tail = llm.generate([ids[-10:]], SamplingParams(**greedy), use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-10:] and cut.outputs[0].token_ids == tail.outputs[0].token_ids
    # Keeping more than the prompt has keeps it whole.
    whole = llm.generate([ids], SamplingParams(truncate_prompt_tokens=1000, **greedy), use_tqdm=False)[0]
    assert whole.prompt_token_ids == ids


def test_minus_one_keeps_what_fits_beside_max_tokens(llm):
    text = "word " * 400  # far beyond max_model_len: refused whole
    with pytest.raises(ValueError, match="too long"):
        llm.generate(text, SamplingParams(max_tokens=4), use_tqdm=False)
    out = llm.generate(text, SamplingParams(truncate_prompt_tokens=-1, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == MAX_LEN - 4 and len(out.outputs[0].token_ids) == 4
    assert out.prompt == text  # the text as given; its ids are the kept tail


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_bad_values_name_the_field(value):
    with pytest.raises(ValueError, match=r"SamplingParams.truncate_prompt_tokens=.* is invalid: must be None, -1"):
        SamplingParams(truncate_prompt_tokens=value)


def test_vllms_tokenization_kwargs_truncate_too(llm):
    """vLLM 0.32 moved truncate_prompt_tokens out of SamplingParams into LLM.generate's tokenization_kwargs: taken
    there too; a key it does not read is refused by name (vLLM logs it and goes on)."""
    ids = list(range(5, 45))
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    cut = llm.generate([ids], greedy, use_tqdm=False, tokenization_kwargs={"truncate_prompt_tokens": 10})[0]
    tail = llm.generate([ids[-10:]], greedy, use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-10:] and cut.outputs[0].token_ids == tail.outputs[0].token_ids
    assert greedy.truncate_prompt_tokens is None  # the caller's parameters are left as they were
    with pytest.raises(ValueError, match=r"tokenization_kwargs \['padding'\] are not supported"):
        llm.generate([ids], greedy, use_tqdm=False, tokenization_kwargs={"padding": True})
    with pytest.raises(ValueError, match="truncation_side='right' is not supported"):
        llm.generate([ids], greedy, use_tqdm=False,
                     tokenization_kwargs={"truncate_prompt_tokens": 10, "truncation_side": "right"})
    assert not llm.engine.has_requests()
