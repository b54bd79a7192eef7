"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs`, engine/prompt_logprobs/scoring.py) against transformers'
own forward in float64: for every prompt token after the first, its logprob given the tokens before it, its rank,
and the top-n, on GQA (Qwen3-MoE), MLA (DeepSeek-V3 with q LoRA) and a hybrid with linear-attention state
(Qwen3-Next); computed over chunked prefills beside other requests, under preemption, never from the prefix cache
(the same prompt served first without them), once for n = 2; bad values refused naming the field. Logprobs are
computed in float32 from the logits, as the sampled tokens' are (vLLM's), so they equal transformers' float64 ones to
float32's precision (1e-5 at these logits' magnitudes)."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM, SamplingParams

from tests.helpers.parity import assert_pool_free, prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

TOP = 3


def _hf_prompt_logprobs(path: str, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax over the vocab at every prompt position but the last, float64: [L - 1, V]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, :-1]
    return torch.log_softmax(logits, dim=-1)


def _check(got, want_LV: torch.Tensor, prompt: list[int]) -> None:
    """got: RequestOutput.prompt_logprobs. The prompt token's logprob and rank, and the top-n ids and logprobs."""
    assert got is not None and len(got) == len(prompt) and got[0] is None
    for p in range(1, len(prompt)):
        lp_V, tok = want_LV[p - 1], prompt[p]
        entry = got[p]
        assert entry[tok].logprob == pytest.approx(lp_V[tok].item(), abs=1e-5), f"position {p}"
        assert entry[tok].rank == int((lp_V > lp_V[tok]).sum()) + 1, f"position {p}"
        top_lp, top_id = lp_V.topk(TOP)
        want_ranks = {int(t): r + 1 for r, t in enumerate(top_id)}
        want_ranks.setdefault(tok, int((lp_V > lp_V[tok]).sum()) + 1)
        assert {t: v.rank for t, v in entry.items()} == want_ranks, f"position {p}"
        for t, v in zip(top_id.tolist(), top_lp.tolist()):
            assert entry[t].logprob == pytest.approx(v, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen3_e6k3", "dsv3_lora", "qwen3_next"])
def test_prompt_logprobs_equal_transformers_forward(model, tiny_model, hf_tiny_model):
    path = tiny_model(model) if model == "qwen3_e6k3" else hf_tiny_model(model)
    ps = prompts(128, seed=41, n=6, lo=2, hi=70)
    target = ps[1]  # 70 tokens: three chunks of the 24-token budget, beside the others' prefills
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=128, block_size=8,
              enable_prefix_caching=True)
    plain = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([target], plain, use_tqdm=False)  # its KV now in the prefix cache
    asked = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=TOP)
    outs = llm.generate(ps, [plain, asked] + [plain] * (len(ps) - 2), use_tqdm=False)
    assert outs[1].num_cached_tokens == 0, "a request asking for prompt logprobs took a prefix-cache hit"
    assert all(o.prompt_logprobs is None for i, o in enumerate(outs) if i != 1)
    _check(outs[1].prompt_logprobs, _hf_prompt_logprobs(path, target), target)
    # The generated tokens are the same as without them (and its first token's logprob is the sampler's).
    assert outs[1].outputs[0].token_ids == llm.generate([target], plain, use_tqdm=False)[0].outputs[0].token_ids
    assert_pool_free(llm)


@pytest.mark.slow
def test_prompt_logprobs_under_preemption_and_for_n_samples(tiny_model):
    path = tiny_model("qwen3_e6k3")
    ps = prompts(128, seed=43, n=6, lo=40, hi=90)
    llm = LLM(path, dtype="float64", max_num_seqs=6, max_num_batched_tokens=48, num_kv_blocks=30, block_size=8)
    asked = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(ps, asked, use_tqdm=False)
    assert llm.engine.stats().num_preemptions_total > 0
    for p, o in zip(ps, outs):
        _check_top1(o.prompt_logprobs, _hf_prompt_logprobs(path, p), p)
    assert_pool_free(llm)
    # n = 2: the prompt scored once (sample 0), the gathered output carries it
    two = llm.generate([ps[0]], SamplingParams(n=2, seed=5, max_tokens=3, prompt_logprobs=0), use_tqdm=False)[0]
    assert len(two.outputs) == 2 and len(two.prompt_logprobs) == len(ps[0])
    assert all(len(e) == 1 for e in two.prompt_logprobs[1:])  # top-0: the prompt token alone


def _check_top1(got, want_LV, prompt) -> None:
    assert got is not None and len(got) == len(prompt) and got[0] is None
    for p in range(1, len(prompt)):
        tok = prompt[p]
        assert got[p][tok].logprob == pytest.approx(want_LV[p - 1, tok].item(), abs=1e-5), f"position {p}"


def test_bad_prompt_logprobs_name_the_field():
    for bad in (-1, 21, 1.5, "3"):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    with pytest.raises(ValueError, match="prompt_logprobs.*do_remote_prefill"):
        SamplingParams(prompt_logprobs=1, kv_transfer_params={"do_remote_prefill": True, "remote_host": "127.0.0.1",
                                                              "remote_port": 9000,
                                                              "remote_kv_token": "a" * 32})
    SamplingParams(prompt_logprobs=1, kv_transfer_params={"do_remote_decode": True})  # the prefill side computes it
    assert SamplingParams(n=3, prompt_logprobs=2).sample(1).prompt_logprobs is None
    assert SamplingParams(n=3, prompt_logprobs=2).sample(0).prompt_logprobs == 2
