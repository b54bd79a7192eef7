"""Speculative decoding under expert parallelism (EP 3 on Ray, gloo): each rank drafts for its own requests, the
verify step is an ordinary EP step with more tokens, ranks with different accepted lengths stay in lockstep; the
greedy outputs equal one rank's without speculation, for Qwen3-MoE and DeepSeek-V3 (MLA)."""
from __future__ import annotations

import functools
import random

import pytest

from moelink.benchmarks.spec_decode import OracleDrafter
from moelink.engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

# 6 prompts of 2-30 tokens (two per rank at EP 3), 8 new tokens: several verify steps per request, the ranks
# accepting different numbers of drafts.
N_PROMPTS, NEW = 6, 8


@pytest.mark.parametrize("name", ["qwen3", "dsv3"])
def test_ep3_greedy_with_drafts_equals_one_rank_without(local_ray, tiny_model, hf_tiny_model, name):
    path = tiny_model("qwen3_e6k3") if name == "qwen3" else hf_tiny_model("dsv3_lora")
    kw = dict(dtype="float64", max_num_seqs=8, max_num_batched_tokens=40, num_kv_blocks=96, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, detokenize=False)
    with LLM(path, **kw) as one:
        vocab = one.engine.config.model.vocab_size
        rng = random.Random(7)
        prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 30))] for _ in range(N_PROMPTS)]
        want = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    ref = {tuple(p): w for p, w in zip(prompts, want)}
    spec = {"method": "ngram", "num_speculative_tokens": 2,
            "drafter_factory": functools.partial(OracleDrafter, ref, 0.6, vocab, 5)}
    _assert_ep3_equals(path, prompts, params, spec, kw, want)


def _assert_ep3_equals(path, prompts, params, spec, kw, want) -> None:
    """EP 3 with `spec` gives `want`; every rank verified drafts (accepting different numbers: lockstep held
    whatever each accepted) and gave all its KV blocks back."""
    with LLM(path, expert_parallel_size=3, speculative_config=spec, **kw) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        per_rank = [s.spec_decode for s in llm.engine.rank_stats()]
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    assert got == want
    assert all(sd is not None and sd.num_accepted_tokens > 0 for sd in per_rank)
    assert len({sd.num_accepted_tokens for sd in per_rank}) > 1


def test_ep3_mtp_drafts_greedy_equals_one_rank_without(local_ray, tmp_path):
    """Method "mtp" (engine/spec/proposer/mtp.py) under EP 3: every rank runs the MTP layer's k forwards per step
    (its MoE dispatching like a main layer's; `moe_only_stages` on a rank without rows or tokens), so the ranks
    stay in lockstep whatever each accepted; the greedy outputs equal one rank's without speculation."""
    from tests.helpers.mtp_checkpoints import bigram_mtp, make_mtp_model

    path = str(bigram_mtp(make_mtp_model(tmp_path / "ckpt", "deepseek_v3"), tmp_path / "bigram"))
    kw = dict(dtype="float64", max_num_seqs=8, max_num_batched_tokens=40, num_kv_blocks=96, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, detokenize=False)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randint(2, 30))] for _ in range(N_PROMPTS)]
    with LLM(path, **kw) as one:
        want = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    spec = {"method": "mtp", "num_speculative_tokens": 2}
    _assert_ep3_equals(path, prompts, params, spec, kw, want)


def test_ep3_eagle3_drafts_greedy_equals_one_rank_without(local_ray, tiny_model, tmp_path):
    """Method "eagle3" (engine/spec/proposer/eagle3.py) under EP 3 with two-batch overlap: each rank's forward keeps
    the head's residual-stream states (each micro-batch its own, joined back in order) and the dense head drafts for
    that rank's requests with no collective, so ranks with no rows run nothing for it and the verify steps stay in
    lockstep whatever each accepted; the greedy outputs equal one rank's without speculation."""
    from tests.helpers.eagle3_heads import bigram_head, scaled_target

    path = str(scaled_target(tiny_model("qwen3_e6k3", num_layers=4), tmp_path / "target"))
    head = str(bigram_head(path, tmp_path / "head", aux_layer_ids=[0, 1, 3]))
    kw = dict(dtype="float64", max_num_seqs=8, max_num_batched_tokens=40, num_kv_blocks=96, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, detokenize=False)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(2, 30))] for _ in range(N_PROMPTS)]
    with LLM(path, **kw) as one:
        want = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    spec = {"method": "eagle3", "model": head, "num_speculative_tokens": 2}
    _assert_ep3_equals(path, prompts, params, spec, dict(kw, enable_two_batch_overlap=True), want)


def test_ep3_dspark_drafts_greedy_equals_one_rank_without(local_ray, tiny_model, tmp_path):
    """Method "dspark" (engine/spec/proposer/dspark.py) under EP 3 with two-batch overlap: each rank's forward keeps
    the tapped states (each micro-batch its own, joined back), writes its requests' context rows and drafts their
    blocks with the dense DFlash-format stages, no collective; greedy outputs equal one rank's without
    speculation."""
    from moelink.engine.tools.dspark_checkpoint import agreeing_draft, bigram_target

    path = str(bigram_target(tiny_model("qwen3_e6k3", num_layers=4), tmp_path / "target", scale=0.1))
    draft = str(agreeing_draft(path, tmp_path / "draft", block_size=3, target_layer_ids=[0, 2], mask_token_id=7))
    kw = dict(dtype="float64", max_num_seqs=8, max_num_batched_tokens=40, num_kv_blocks=96, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, detokenize=False)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(2, 30))] for _ in range(N_PROMPTS)]
    with LLM(path, **kw) as one:
        want = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    spec = {"method": "dspark", "model": draft, "num_speculative_tokens": 3}
    _assert_ep3_equals(path, prompts, params, spec, dict(kw, enable_two_batch_overlap=True), want)
