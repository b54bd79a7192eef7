"""DeepSeek-V4.1 under speculative decoding (issue 81): a verify step rolls every ring of its state back to the accepted
tokens (engine/models/deepseek_v41/rollback.py: the window KV, a KV source's filling group; the Engram look-back
through engine/models/ngram_embedding's replay), so the greedy tokens equal transformers' (the fixture of
tests/engine/test_deepseek_v41.py) with drafts rejected at every position, more drafts a step than the smallest ring
has slots; and its DSpark draft layers (engine/models/deepseek_v41/dspark.py, tests/helpers/dsv41_dspark_checkpoint.py)
drafting as method "dspark": constructed to agree with the target, nearly every draft accepted; random, seldom; the
outputs equal decoding without speculation either way, batched and chunked, under preemption and from prefix hits.

transformers' main branch (0a2080b4) has no forward for V4.1's draft layers (its loader skips `mtp.*`), so no
reference draft logits are recorded: the drafts are checked by what they make the target accept, and the outputs
against the fixture or the run without speculation.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.models.deepseek_v41.rollback import rewrite_ring
from tests.helpers.dspark_draws import acceptance, generate, kv_bytes
from tests.helpers.dsv41_dspark_checkpoint import save_dsv41_with_dspark
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "deepseek_v41"
REF = json.loads((FIXTURES / "reference.json").read_text())
PROMPTS = [c["prompt"] for c in REF["cases"]]
WANT = [c["greedy"] for c in REF["cases"]]

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # it starts many engines


@pytest.mark.parametrize("ring,q", [(2, 5), (6, 4), (3, 3)])
def test_every_ring_slot_takes_its_newest_accepted_row(ring, q):
    """Two verifying sequences at positions p0 .. p0 + q - 1 (more tokens than slots where ring < q): for every
    number accepted, each slot holds what writing only the accepted positions, one after another, leaves."""
    p0 = torch.tensor([7, 4])
    slots = torch.tensor([2, 0])
    for n in [(a, b) for a in range(1, q + 1) for b in (1, q)]:
        pool = torch.full((4, ring, 1), -1.0)
        want = pool.clone()
        for v in range(2):  # before the step: positions up to p0 - 1 written (value = position)
            for t in range(int(p0[v])):
                pool[slots[v], t % ring] = want[slots[v], t % ring] = float(t)
            for t in range(int(p0[v]), int(p0[v]) + n[v]):
                want[slots[v], t % ring] = float(t)
        copy = pool.index_select(0, slots)
        step = torch.tensor([float(p) for v in range(2) for p in range(int(p0[v]), int(p0[v]) + q)])[:, None]
        for v in range(2):  # the step wrote every token, rejected ones included
            for j in range(q):
                pool[slots[v], (int(p0[v]) + j) % ring] = step[v * q + j]
        rewrite_ring(pool, copy, step, slots, torch.tensor([0, q, 2 * q]), torch.arange(2 * q), p0, torch.tensor(n))
        assert torch.equal(pool, want), (ring, q, n)


@pytest.mark.slow
def test_ngram_drafts_roll_back_to_the_fixture_tokens_chunked_and_batched():
    """Prompt-lookup drafts, 3 a step (the rate-2 source's ring has 2 slots, the window 6), mostly rejected on these
    random prompts: seven prompts at once in chunks of 13 tokens, the tokens transformers computes."""
    llm = LLM(str(FIXTURES / "tiny"), dtype="float64", max_num_seqs=7, max_num_batched_tokens=13, num_kv_blocks=96,
              block_size=8, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                "prompt_lookup_min": 1, "prompt_lookup_max": 3})
    assert_same(engine_greedy(llm, PROMPTS, REF["new_tokens"]), WANT, PROMPTS)
    sd = llm.engine.stats().spec_decode
    assert sd.num_draft_tokens > sd.num_accepted_tokens > 0, sd  # drafts rejected and accepted both
    assert_pool_free(llm)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return {"agree": save_dsv41_with_dspark(tmp_path_factory.mktemp("agree") / "c", agree=True),
            "random": save_dsv41_with_dspark(tmp_path_factory.mktemp("random") / "c")}


def _generate(path: str, spec=None, **kw) -> tuple[list, object]:
    return generate(path, spec, **{"dtype": "float64", **kw})


SPEC = {"method": "dspark", "num_speculative_tokens": 3}  # blocks of 4: the anchor and 3 drafts


def test_agreeing_v41_draft_layers_are_accepted_and_outputs_exact(ckpts):
    sd = acceptance(ckpts["agree"], SPEC, "V4.1 DSpark, agreeing draft layers", dtype="float64")
    assert sd.acceptance_rate > 0.9, sd


@pytest.mark.slow
def test_random_v41_draft_layers_keep_outputs_exact(ckpts):
    sd = acceptance(ckpts["random"], SPEC, "V4.1 DSpark, random draft layers", dtype="float64")
    assert sd.num_verify_rows > 5 and sd.acceptance_rate < 0.5, sd


@pytest.mark.slow
def test_v41_dspark_under_preemption_then_prefix_hits(ckpts):
    """A pool small enough to preempt, the prompts run twice (the second time from state checkpoints and the KV
    sources' pages): the outputs equal the run without speculation, hits and preemptions asserted."""
    kw = dict(num_kv_blocks=9, max_num_seqs=4, num_state_checkpoints=16)
    got, stats = _generate(ckpts["random"], SPEC, rounds=2, **kw)
    assert got == _generate(ckpts["random"], None, **kw)[0]
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0, stats
    assert stats.spec_decode.num_draft_tokens > 0


def test_dummy_v41_draft_layers_load_and_draft(ckpts):
    got, stats = _generate(ckpts["random"], SPEC, prompts=2, dtype="float32", load_format="dummy")
    assert len(got) == 2 and stats.spec_decode.num_draft_tokens > 0


def test_the_draft_layers_route_over_their_own_experts(ckpts):
    """dspark_n_routed_experts / dspark_num_experts_per_tok: the draft layers' MoE is 4 experts, top 1 (the main
    layers' 6, top 2); a count past them is refused naming the field, and so is an expert-parallel run whose
    draft experts differ from the main layers', and method "mtp" on them. The Markov head is read under either
    published name."""
    from moelink.engine.config.dspark import read_bundled_dspark
    from moelink.engine.config.model import ModelConfig
    from moelink.engine.models.deepseek_v41.dspark import V41DSparkStages, stage_config
    from moelink.kernels.ops import ReferenceKernels

    cfg = ModelConfig.from_pretrained(ckpts["random"], "float32")
    s = stage_config(cfg)
    assert (cfg.num_experts, cfg.top_k, s.num_experts, s.top_k, s.moe.router.top_k) == (6, 2, 4, 1, 1)
    meta, V, D = torch.device("meta"), cfg.vocab_size, cfg.hidden_size
    stages = V41DSparkStages(cfg, read_bundled_dspark(cfg.hf_config), ReferenceKernels(), meta,
                             torch.empty(V, D, device=meta), torch.empty(V, D, device=meta))
    plan = stages.weight_plan()
    assert "mtp.1.ffn.experts.3.w1.weight" in plan and "mtp.1.ffn.experts.4.w1.weight" not in plan
    assert "mtp.0.attn.q_norm.weight" in plan and "mtp.1.hc_head_fn" not in plan  # no hyper-head: a collapse
    assert "mtp.1.markov_head.markov_w1.weight" in plan
    published = V41DSparkStages(cfg, read_bundled_dspark(cfg.hf_config), ReferenceKernels(), meta,
                                torch.empty(V, D, device=meta), torch.empty(V, D, device=meta),
                                names={"mtp.1.markov_head.embed.weight", "mtp.1.markov_head.head.weight"})
    assert {"mtp.1.markov_head.embed.weight", "mtp.1.markov_head.head.weight"} <= set(published.weight_plan())
    bad = dict(cfg.hf_config, dspark_num_experts_per_tok=5)
    with pytest.raises(ValueError, match="dspark_num_experts_per_tok=5"):
        stage_config(dataclasses.replace(cfg, hf_config=bad))
    with pytest.raises(ValueError, match="dspark_n_routed_experts=4 differs"):
        V41DSparkStages(cfg, read_bundled_dspark(cfg.hf_config), ReferenceKernels(), meta,
                        torch.empty(V, D, device=meta), torch.empty(V, D, device=meta), ep=object())
    with pytest.raises(ValueError, match="are DSpark stages .* use method 'dspark'"):  # not MTP modules
        LLM(ckpts["random"], dtype="float32", max_model_len=64, num_kv_blocks=16, block_size=8,
            speculative_config={"method": "mtp", "num_speculative_tokens": 1})


def test_kv_sizing_counts_the_draft_layers_context_rows(ckpts):
    """Each draft layer keeps one shared KV head a token (the drafter's kv_bytes_per_token), counted before the ranks
    size their caches."""
    got, want = kv_bytes(ckpts["random"])
    assert got == want == 2 * 64 * 4
