"""Adaptive draft length end to end (one rank, CPU; scheduler/draft_control.py): requests whose drafts are always
rejected stop costing verify rows within a few steps while the others keep drafting, and every output stays
token-identical to decoding without speculation; the knobs reach the scheduler from speculative_config."""
from __future__ import annotations

import random

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.engine_args import EngineArgs
from moelink.scheduler.draft_control import DraftControl

K = 3
TOKENS = 40


class SplitDrafter:
    """Proposes each request's known continuation: right for the `good` prompts, always wrong (the right token
    + 1) for the others, as prompts built against a drafter would make it."""

    def __init__(self, reference: dict[tuple, list[int]], good: set[tuple], vocab: int):
        self.reference, self.good, self.vocab = reference, good, vocab
        self.asked: dict[tuple, int] = {}  # prompt -> proposals made

    def propose(self, states, k: int) -> list[list[int]]:
        out = []
        for st in states:
            key = tuple(st.prompt_token_ids)
            self.asked[key] = self.asked.get(key, 0) + 1
            pos = len(st.output_token_ids)
            ref = self.reference[key][pos: pos + k]
            out.append(ref if key in self.good else [(t + 1) % self.vocab for t in ref])
        return out


def _llm(path, spec=None):
    return LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=64, num_kv_blocks=200, block_size=4,
               speculative_config=spec)


def test_rejected_drafts_shrink_and_outputs_stay_exact(tiny_model, monkeypatch):
    path = tiny_model("qwen3_e6k3")
    params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
    rng = random.Random(0)
    with _llm(path) as llm:
        vocab = llm.engine.config.model.vocab_size
        prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(4, 30))] for _ in range(12)]
        want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                            use_tqdm=False)]
    reference = {tuple(p): w for p, w in zip(prompts, want)}
    good = {tuple(p) for p in prompts[::3]}  # a third are normal users, the rest adversarial

    verified: dict[tuple, list[tuple[int, int]]] = {}
    observe = DraftControl.observe

    def record(self, req, num_drafts, accepted):
        verified.setdefault(tuple(req.prompt_token_ids), []).append((num_drafts, accepted))
        observe(self, req, num_drafts, accepted)

    monkeypatch.setattr(DraftControl, "observe", record)
    spec = {"method": "ngram", "num_speculative_tokens": K,
            "drafter_factory": lambda: SplitDrafter(reference, good, vocab)}
    with _llm(path, spec) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                           use_tqdm=False)]
        sd = llm.engine.stats().spec_decode
        asked = llm.engine.executor.worker.runner.plugin("speculative").drafter.asked
    assert got == want
    for p in prompts:
        rows = verified.get(tuple(p), [])
        if tuple(p) in good:  # every draft right: full length all along, ~K + 1 tokens a step
            assert all(a == k for k, a in rows) and sum(a for _, a in rows) >= TOKENS // 2
        else:  # 3 drafts, then 1, then none but a probe every 8, 16, 32 steps
            assert rows[:2] == [(3, 0), (1, 0)] and all(k == 1 and a == 0 for k, a in rows[2:])
            assert sum(k for k, _ in rows) <= 3 + 1 + 3
            # While it waits for its next probe the drafter is not even asked (TOKENS - 1 steps could draft).
            assert asked[tuple(p)] <= 12
    assert sd.num_draft_tokens < 2 * sd.num_accepted_tokens  # the failing drafts cost little


@pytest.mark.parametrize("extra, want", [
    ({}, (0.3, 0.5, 8)),
    ({"min_draft_acceptance": 0.0, "max_verify_fraction": 1.0, "draft_probe_interval": 3}, (0.0, 1.0, 3)),
])
def test_speculative_config_knobs_reach_the_scheduler(tiny_model, extra, want):
    path = tiny_model("qwen3_e6k3")
    spec = {"method": "ngram", "num_speculative_tokens": 2, **extra}
    cfg = EngineArgs(path, dtype="float32", num_kv_blocks=64, speculative_config=spec,
                     client_fairness=False).create_engine_config().scheduler
    assert (cfg.spec_min_draft_acceptance, cfg.spec_max_verify_fraction, cfg.spec_probe_interval) == want
    assert cfg.client_fairness is False
