"""Speculative decoding on DeepSeek-V4 (engine/models/deepseek_v4/rollback.py): drafts right with probability 0.6
(benchmarks/spec_decode.OracleDrafter: accepted and rejected drafts both in play, k = 3, the most the tiny model's
4-slot CSA compressor ring allows), verified in steps whose rejected drafts wrote the window ring, the compressor
rings and completed compressed entries; the states rolled back to the accepted tokens, greedy outputs equal
transformers' token for token (prompts of 1..150 tokens, chunked, several sequences a step, a small pool)."""
from __future__ import annotations

import functools

import pytest

from moelink.benchmarks.spec_decode import OracleDrafter
from moelink.engine import LLM

from tests.helpers.dsv4_checkpoint import VOCAB, save_dsv4_checkpoint
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, hf_greedy, prompts

MAX_NEW = 16


@pytest.fixture(scope="module")
def dsv4_path(tmp_path_factory) -> str:
    return save_dsv4_checkpoint(tmp_path_factory.mktemp("dsv4_spec"))


@pytest.mark.slow
def test_greedy_with_drafts_equals_transformers(dsv4_path):
    ps = prompts(VOCAB, seed=21, n=6, lo=1, hi=150)
    want = hf_greedy(dsv4_path, ps, MAX_NEW)
    ref = {tuple(p): w for p, w in zip(ps, want)}
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, ref, 0.6, vocab=VOCAB, seed=2)}
    llm = LLM(dsv4_path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48, num_kv_blocks=160, block_size=8,
              speculative_config=spec)
    assert_same(engine_greedy(llm, ps, MAX_NEW), want, ps)
    sd = llm.engine.stats().spec_decode
    assert 0.3 < sd.acceptance_rate < 0.95, sd  # drafts accepted and rejected: the rollback ran both ways
    assert_pool_free(llm)
