"""Greedy outputs of the engine equal `transformers` generate, token for token, in float64.

The engine runs 16 prompts together under a small token budget (chunked
prefill, several sequences per step); transformers runs each prompt alone.
"""
from __future__ import annotations

import random

import pytest
import torch

from moelink.engine import LLM, SamplingParams

from tests.helpers.tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.slow  # transformers generate beside the engine, in float64

MAX_NEW = 10


def _prompts(vocab: int, seed: int, n: int = 16, lo: int = 1, hi: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    lens = [lo, hi] + [rng.randint(lo, hi) for _ in range(n - 2)]
    return [[rng.randrange(vocab) for _ in range(L)] for L in lens]


_HF_CACHE: dict = {}


def hf_greedy(path: str, prompts: list[list[int]], max_new: int = MAX_NEW) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    if path not in _HF_CACHE:
        _HF_CACHE.clear()
        _HF_CACHE[path] = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float64, experts_implementation="eager"
        ).eval()
    model = _HF_CACHE[path]
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                                 min_new_tokens=max_new, eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def engine_greedy(llm: LLM, prompts, max_new: int = MAX_NEW) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _assert_pool_free(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_greedy_parity_chunked_batched(tiny_model, name):
    path = tiny_model(name)
    vocab = TINY_CONFIGS[name]["vocab_size"]
    prompts = _prompts(vocab, seed=len(name))
    llm = LLM(path, dtype="float64", max_num_seqs=8, max_num_batched_tokens=48, num_kv_blocks=256, block_size=16)
    got = engine_greedy(llm, prompts)
    want = hf_greedy(path, prompts)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i} (len {len(prompts[i])}): engine {g} != transformers {w}"
    _assert_pool_free(llm)


@pytest.mark.parametrize("name", ["qwen3_e6k3", "mixtral_e5k3"])
def test_greedy_parity_under_preemption(tiny_model, name):
    path = tiny_model(name)
    vocab = TINY_CONFIGS[name]["vocab_size"]
    prompts = _prompts(vocab, seed=7, lo=20, hi=120)
    # 24 blocks of 8 tokens hold about two long prompts: eight running sequences must preempt.
    llm = LLM(path, dtype="float64", max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=24, block_size=8)
    got = engine_greedy(llm, prompts, max_new=16)
    assert llm.engine.stats().num_preemptions_total > 0
    assert got == hf_greedy(path, prompts, max_new=16)
    _assert_pool_free(llm)


def test_prefix_caching_hits_and_parity(tiny_model):
    path = tiny_model("qwen3_e6k3")
    rng = random.Random(3)
    prefix = [rng.randrange(512) for _ in range(64)]
    prompts = [prefix + [rng.randrange(512) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=128, num_kv_blocks=128, block_size=16)
    first = engine_greedy(llm, prompts[:1])
    hits_before = llm.engine.stats().prefix_cache_hits
    rest = engine_greedy(llm, prompts[1:])
    hits = llm.engine.stats().prefix_cache_hits - hits_before
    assert hits >= 64 * 5, f"expected the 64-token prefix to hit for 5 prompts, got {hits} hit tokens"
    assert first + rest == hf_greedy(path, prompts)
    _assert_pool_free(llm)
