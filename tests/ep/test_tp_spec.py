"""Speculative decoding under tensor parallelism (Ray, CPU ranks, gloo, float64): every rank of a TP group drafts
(engine/rank/drafter.py), the verify step's emitted tokens and counts are the group's first rank's
(engine/rank/spec_verify.py), and greedy outputs equal one rank's without speculation:
- host drafts (a drafter_factory of known acceptance, benchmarks/spec_decode.OracleDrafter: drafts accepted and
  rejected) on Qwen3-MoE at `-tp 2`;
- the checkpoint's MTP layer (method "mtp", a "bigram" MTP layer that guesses the main model's next token:
  tests/helpers/mtp_checkpoints.bigram_mtp) split over the group like a main layer: DeepSeek-V3 (MLA) at `-tp 2`
  (experts split) and `-tp 2 -ep 2` (experts in EP, token slices), GLM-4-MoE (GQA: the MTP cache holds the rank's
  kv heads) at `-tp 2`;
- an EAGLE-3 head, replicated on every rank, on Qwen3-MoE at `-tp 2`;
- unseeded random sampling with drafts at `-tp 2`: both ranks of the group hold the same tokens after every verify
  step (each rank's host drafter records the request states it sees), though each rank's own draws differ.
Lean: 4 prompts of 2-24 tokens, 6 new tokens (several verify steps per request)."""
from __future__ import annotations

import functools
import json
import random

import pytest

from moelink.benchmarks.spec_decode import OracleDrafter
from moelink.engine import LLM, SamplingParams

from tests.helpers.recording_drafter import RecordingDrafter

pytestmark = pytest.mark.slow

N_PROMPTS, NEW = 4, 6
KW = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=64, block_size=8)
PARAMS = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, detokenize=False)


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 24))] for _ in range(N_PROMPTS)]


def _one_rank(path: str, prompts) -> list[list[int]]:
    """One rank's greedy tokens without speculation: the oracle."""
    with LLM(path, **KW) as one:
        return [o.outputs[0].token_ids for o in one.generate(prompts, PARAMS, use_tqdm=False)]


def _assert_tp_equals(path: str, prompts, want, spec: dict, tp: int = 2, ep: int = 1):
    """`-tp tp -ep ep` with `spec` gives `want`; returns the group's speculative stats (drafts were verified)."""
    with LLM(path, tensor_parallel_size=tp, expert_parallel_size=ep, speculative_config=spec, **KW) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]
        stats = llm.engine.rank_stats()
        assert all(s.num_free_blocks == s.num_total_blocks for s in stats)
        sd = stats[0].spec_decode
    assert got == want
    assert sd is not None and sd.num_draft_tokens > 0
    return sd


def test_tp2_host_drafts_equal_one_rank(local_ray, tiny_model):
    path = tiny_model("qwen3_e6k3")
    vocab = 512
    ps = _prompts(vocab, seed=11)
    want = _one_rank(path, ps)
    ref = {tuple(p): w for p, w in zip(ps, want)}
    spec = {"method": "ngram", "num_speculative_tokens": 2, "min_draft_acceptance": 0, "max_verify_fraction": 1,
            "drafter_factory": functools.partial(OracleDrafter, ref, 0.6, vocab, 5)}
    sd = _assert_tp_equals(path, ps, want, spec)
    assert 0 < sd.num_accepted_tokens < sd.num_draft_tokens  # accepted and rejected drafts both verified


@pytest.fixture(scope="module")
def mtp_paths(tmp_path_factory):
    """Bigram MTP checkpoints (one per family, made once for the module) and each one's one-rank reference."""
    from tests.helpers.mtp_checkpoints import bigram_mtp, make_mtp_model

    out: dict[str, tuple[str, list, list]] = {}

    def get(arch: str):
        if arch not in out:
            root = tmp_path_factory.mktemp(f"mtp_{arch}")
            path = str(bigram_mtp(make_mtp_model(root / "ckpt", arch), root / "bigram"))
            ps = _prompts(320, seed=3)
            out[arch] = (path, ps, _one_rank(path, ps))
        return out[arch]
    return get


@pytest.mark.parametrize("arch,ep", [("deepseek_v3", 1), ("deepseek_v3", 2), ("glm4_moe", 1)])
def test_tp2_mtp_drafts_equal_one_rank(local_ray, mtp_paths, arch, ep):
    path, ps, want = mtp_paths(arch)
    spec = {"method": "mtp", "num_speculative_tokens": 2, "min_draft_acceptance": 0, "max_verify_fraction": 1}
    sd = _assert_tp_equals(path, ps, want, spec, ep=ep)
    assert sd.num_accepted_tokens > 0  # the bigram layer's drafts, from the gathered logits, are accepted


def test_tp2_eagle3_drafts_equal_one_rank(local_ray, tiny_model, tmp_path):
    from tests.helpers.eagle3_heads import bigram_head, scaled_target

    path = str(scaled_target(tiny_model("qwen3_e6k3", num_layers=4), tmp_path / "target"))
    head = str(bigram_head(path, tmp_path / "head", aux_layer_ids=[0, 1, 3]))
    ps = _prompts(512, seed=5)
    want = _one_rank(path, ps)
    spec = {"method": "eagle3", "model": head, "num_speculative_tokens": 2, "min_draft_acceptance": 0,
            "max_verify_fraction": 1}
    sd = _assert_tp_equals(path, ps, want, spec)
    assert sd.num_accepted_tokens > 0


def test_tp2_sampled_verify_same_tokens_on_every_rank(local_ray, tiny_model, tmp_path):
    """Unseeded sampling at temperature 1: the acceptance test's uniforms and the recovered / bonus tokens are each
    rank's own draws, so only the group's first rank's tokens, broadcast, keep the ranks' request states equal."""
    path = tiny_model("qwen3_e6k3")
    ps = _prompts(512, seed=13)
    spec = {"method": "ngram", "num_speculative_tokens": 2, "min_draft_acceptance": 0, "max_verify_fraction": 1,
            "drafter_factory": functools.partial(RecordingDrafter, str(tmp_path))}
    params = SamplingParams(temperature=1.0, max_tokens=NEW, ignore_eos=True, detokenize=False)
    with LLM(path, tensor_parallel_size=2, speculative_config=spec, **KW) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)]
        sd = llm.engine.stats().spec_decode
    assert sd.num_draft_tokens > 0 and all(len(g) == NEW for g in got)
    seen = [f.read_text().splitlines() for f in sorted(tmp_path.glob("*.jsonl"))]
    assert len(seen) == 2 and seen[0] and seen[0] == seen[1]  # the two ranks' request states, step by step
    # The engine's outputs are what the ranks hold: each request's last recorded tokens begin with its prompt and
    # continue with its output.
    last = {rid: toks for rid, toks in map(json.loads, seen[0])}
    outs = {tuple(p): g for p, g in zip(ps, got)}
    for toks in last.values():
        prompt = next(p for p in ps if toks[: len(p)] == p)
        assert toks[len(prompt):] == outs[tuple(prompt)][: len(toks) - len(prompt)]
