"""`SamplingParams(n=...)` in the Python API (issue 27, item 9), as over HTTP and gRPC: `LLM.generate` returns one
RequestOutput per prompt holding n CompletionOutputs (index 0..n-1), each sample its own engine request; seeded,
sample i draws with seed + i, as the servers derive it, so a seeded call is reproducible sample by sample."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams

KW = dict(dtype="float32", max_num_seqs=8, num_kv_blocks=128, max_model_len=128)
PROMPTS = ["Hello world", [5, 6, 7, 8]]


@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model("qwen3_e6k3"), **KW) as llm:
        yield llm


def _tokens(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


def test_n_samples_per_prompt_with_seeds_derived_as_the_servers_do(llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    assert len(outs) == len(PROMPTS)
    for out in outs:
        assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
        assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in out.outputs)
        assert len({tuple(t) for t in _tokens(out)}) > 1, "the samples drew the same stream"
    assert outs[0].prompt == "Hello world" and outs[1].prompt_token_ids == [5, 6, 7, 8]
    assert outs[0].request_id != outs[1].request_id and "-" not in outs[0].request_id
    # Sample i is the request with seed 7 + i, alone: the same tokens, whatever ran beside it.
    for i in range(3):
        alone = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=7 + i, max_tokens=8, ignore_eos=True),
                             use_tqdm=False)
        assert [o.outputs[0].token_ids for o in alone] == [_tokens(out)[i] for out in outs]
    again = llm.generate(PROMPTS, sp, use_tqdm=False)
    assert [_tokens(o) for o in again] == [_tokens(o) for o in outs]


def test_n_per_prompt_params(llm):
    greedy = SamplingParams(temperature=0, max_tokens=6)
    seeded = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    one, two = llm.generate(PROMPTS, [seeded, greedy], use_tqdm=False)
    assert len(one.outputs) == 2 and len(two.outputs) == 1
    want = [llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, seed=3 + i, max_tokens=6, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids for i in range(2)]
    assert _tokens(one) == want


@pytest.mark.parametrize("temperature", [0, 0.0, 1e-6])
def test_n_greedy_samples_are_refused_as_vllm_refuses_them(temperature):
    """vLLM 0.32 (SamplingParams._verify_greedy_sampling): n > 1 at temperature 0 would be n copies."""
    with pytest.raises(ValueError, match=r"SamplingParams.n=2 is invalid: must be 1 when using greedy sampling"):
        SamplingParams(n=2, temperature=temperature)
    assert SamplingParams(n=1, temperature=temperature).n == 1


def test_a_bad_prompt_among_n_samples_adds_nothing(llm):
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\]"):
        llm.generate([PROMPTS[0], [10 ** 9]], SamplingParams(n=4, max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_requests()


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2"])
def test_n_must_be_a_positive_integer(n):
    with pytest.raises(ValueError, match=rf"SamplingParams.n=.* is invalid: must be an integer >= 1"):
        SamplingParams(n=n)


def test_an_engine_request_is_one_sample(llm):
    """Below LLM (LLMEngine, AsyncEngine) a request with n > 1 is refused, never run as one sample."""
    with pytest.raises(ValueError, match=r"SamplingParams.n=2 is invalid for one engine request.*sample\(i\)"):
        llm.engine.process_inputs("x", [1, 2], SamplingParams(n=2))


def test_sample_params():
    sp = SamplingParams(n=3, seed=10, stop=["."])
    assert [(p.n, p.seed) for p in map(sp.sample, range(3))] == [(1, 10), (1, 11), (1, 12)]
    assert SamplingParams(n=2).sample(1).seed is None and sp.sample(1).stop is sp.stop
