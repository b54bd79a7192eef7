"""Speculative decoding with the checkpoint's MTP layer (method "mtp", engine/spec/proposer/mtp.py), one rank.

- Greedy outputs with MTP drafts are token-identical to decoding without speculation (DeepSeek-V3: MLA; GLM-4-MoE:
  GQA), k = 1 and 2, with chunked prefill and preemption in play, on checkpoints whose MTP layer guesses the main
  model's next token (tests.helpers.mtp_checkpoints.bigram_mtp), so drafts are accepted often and rejected too.
- Every draft the engine produced equals an independent recomputation: the main model and the MTP layer run from
  scratch over the request's whole sequence (fresh caches, one prefill each; no chunks, no verify steps, no scratch
  blocks), then chained as the drafter chains (its own output state and its last draft, one position on), in
  float64, on random weights (k = 3: two chained steps).
- Requests with penalties or logprobs decode as without speculation; seeded sampling repeats.
- The drafter's device work makes no device→host sync (counted on CPU).
- FP8 (online weights, fp8 KV cache) and load_format "dummy" run the MTP layer too; KV sizing counts its cache
  layer.
"""
from __future__ import annotations

import random

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.engine_args import EngineArgs
from moelink.engine.config.model import ModelConfig
from moelink.engine.spec.proposer import mtp as mtp_proposer

from tests.helpers.draft_spy import record_drafts
from tests.helpers.mtp_checkpoints import VOCAB, bigram_mtp, make_mtp_model
from tests.helpers.mtp_oracle import MTPOracle as _Oracle, generate_greedy

ARCHS = ("deepseek_v3", "glm4_moe")


# bigram_mtp's MTP-layer scale per variant: "random" is make_mtp_model's checkpoint itself.
VARIANTS = {"bigram": 0.0, "bigram_kv": 0.1}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoints(arch, variant) → path: the random MTP checkpoint ("random"), or a bigram_mtp copy of it
    ("bigram": the MTP layer is the main model's bigram; "bigram_kv": with its own computation kept at 0.1)."""
    built: dict = {}

    def get(arch: str, variant: str) -> str:
        if (arch, "random") not in built:
            built[arch, "random"] = str(make_mtp_model(tmp_path_factory.mktemp(arch) / "ckpt", arch))
        if (arch, variant) not in built:
            built[arch, variant] = str(bigram_mtp(built[arch, "random"], tmp_path_factory.mktemp(arch) / variant,
                                                  mtp_scale=VARIANTS[variant]))
        return built[arch, variant]

    return get


def _prompts(n: int = 10, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 40))] for _ in range(n)]


def _generate(path: str, spec=None, dtype: str = "float32", max_tokens: int = 16, **kw) -> tuple[list, object]:
    return generate_greedy(path, _prompts(), spec, dtype, max_tokens, **kw)


@pytest.fixture(scope="module")
def plain(checkpoints):
    cache: dict = {}

    def get(arch: str, variant: str, dtype: str = "float32") -> list:
        if (arch, variant, dtype) not in cache:
            cache[arch, variant, dtype] = _generate(checkpoints(arch, variant), dtype=dtype)[0]
        return cache[arch, variant, dtype]

    return get


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_mtp_drafts_equals_plain_decoding(checkpoints, plain, arch, k):
    got, stats = _generate(checkpoints(arch, "bigram"), {"method": "mtp", "num_speculative_tokens": k})
    assert got == plain(arch, "bigram")
    sd = stats.spec_decode
    assert stats.num_preemptions_total > 0
    # Accepted often (the bigram MTP layer), rejected too; the counters agree with each other.
    assert 0.4 < sd.acceptance_rate < 1.0, sd
    assert sum(sd.accepted_per_position) == sd.num_accepted_tokens
    assert sd.num_verify_rows <= sd.num_draft_tokens <= k * sd.num_verify_rows
    assert all(a >= b for a, b in zip(sd.accepted_per_position, sd.accepted_per_position[1:]))


def test_penalties_logprobs_and_seeded_sampling(checkpoints):
    """Requests with penalties or logprobs verify MTP drafts with those processors at every position and decode as
    without speculation; sampled requests verify greedy drafts (q one-hot) and reproduce under a seed."""
    path = checkpoints("deepseek_v3", "bigram")
    prompts = [{"prompt_token_ids": p} for p in _prompts(4, seed=1)]
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)]
    kw = dict(dtype="float32", max_model_len=256, block_size=4, num_kv_blocks=64)
    with LLM(path, **kw) as llm:
        want = llm.generate(prompts, params, use_tqdm=False)
    runs = []
    for _ in range(2):
        with LLM(path, speculative_config={"method": "mtp", "num_speculative_tokens": 2}, **kw) as llm:
            runs.append(llm.generate(prompts, params, use_tqdm=False))
            assert llm.engine.stats().spec_decode.num_accepted_tokens > 0
    got = runs[0]
    for i in (0, 1, 3):
        assert got[i].outputs[0].token_ids == want[i].outputs[0].token_ids
    # Other rows verify drafts in the same steps: the matmuls' shapes differ, so float32 logprobs by rounding only.
    for g, w in zip(got[1].outputs[0].logprobs, want[1].outputs[0].logprobs, strict=True):
        assert g.keys() == w.keys() and all(abs(g[t].logprob - w[t].logprob) < 1e-4 for t in g)
    assert [o.outputs[0].token_ids for o in runs[0]] == [o.outputs[0].token_ids for o in runs[1]]


def test_mtp_drafting_reads_nothing_back_from_the_device(checkpoints, monkeypatch):
    """The drafter's device work (catch-up, accepted offsets, chain) makes no device→host sync: counted on CPU by
    tests.helpers.host_syncs, with the CPU reference expert kernel's own per-expert loop left out."""
    from moelink.engine.spec.proposer.mtp import MTPDrafter
    from moelink.moe.layer import MoELayer

    from tests.helpers.host_syncs import HostSyncCounter

    draft = MTPDrafter.draft
    with HostSyncCounter() as counter:
        def counted(self, *args, **kwargs):
            for m in self.layer.modules():
                if isinstance(m, MoELayer) and not hasattr(m.expert_format, "_paused"):
                    run = m.expert_format.run

                    def paused(*a, _run=run, **k):
                        with counter.paused():
                            return _run(*a, **k)
                    m.expert_format.run, m.expert_format._paused = paused, True
            with counter.counting():
                return draft(self, *args, **kwargs)

        monkeypatch.setattr(MTPDrafter, "draft", counted)
        _, stats = _generate(checkpoints("deepseek_v3", "bigram"), {"method": "mtp", "num_speculative_tokens": 3},
                             max_tokens=8)
    assert stats.spec_decode.num_accepted_tokens > 0
    assert counter.count == 0, counter.where


@pytest.mark.parametrize("variant", ["random", "bigram_kv"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_mtp_drafts_equal_the_layer_run_over_the_whole_sequence(checkpoints, plain, arch, variant, monkeypatch):
    """Random weights: drafts depend on every part of the MTP layer (its KV cache included) but are seldom
    accepted; "bigram_kv": accepted often, so the accepted lengths (which position drafts) are in play too."""
    path, k = checkpoints(arch, variant), 3
    seen = record_drafts(monkeypatch)
    # Scratch for one row at first: steps with more rows grow the MTP cache (its real blocks kept) mid-run.
    monkeypatch.setattr(mtp_proposer, "_SCRATCH_ROWS", 1)
    got, stats = _generate(path, {"method": "mtp", "num_speculative_tokens": k}, dtype="float64")
    assert got == plain(arch, variant, "float64")
    assert stats.num_preemptions_total > 0 and len(seen) > 50
    oracle = _Oracle(path)
    wants = oracle.all_drafts([tokens for tokens, _ in seen], k)
    wrong = [(tokens, drafts, want) for (tokens, drafts), want in zip(seen, wants) if drafts != want]
    assert not wrong, f"{len(wrong)} of {len(seen)} drafts differ, e.g. {wrong[0]}"


@pytest.mark.parametrize("extra", [dict(quantization="fp8", fp8_block_size=[16, 16]), dict(kv_cache_dtype="fp8")],
                         ids=["fp8_weights", "fp8_kv_cache"])
def test_fp8_weights_and_kv_cache(checkpoints, extra):
    """The MTP layer quantized at load like a main layer (eh_proj float), or its cache layer in fp8 as the model's."""
    path = checkpoints("deepseek_v3", "bigram")
    want, _ = _generate(path, max_tokens=8, **extra)
    got, stats = _generate(path, {"method": "mtp", "num_speculative_tokens": 2}, max_tokens=8, **extra)
    assert got == want and stats.spec_decode.num_accepted_tokens > 0


def test_dummy_weights_run_the_mtp_layer(checkpoints):
    path = checkpoints("deepseek_v3", "random")
    want, _ = _generate(path, load_format="dummy", max_tokens=6)
    got, stats = _generate(path, {"method": "mtp", "num_speculative_tokens": 2}, load_format="dummy", max_tokens=6)
    assert got == want and stats.spec_decode.num_draft_tokens > 0


def test_kv_sizing_counts_the_mtp_cache_layer(checkpoints):
    path = checkpoints("glm4_moe", "random")
    per_layer = ModelConfig.from_pretrained(path).attention.kv_bytes_per_token(torch.float32) * 4
    budget = 1000 * per_layer

    def blocks(spec) -> int:
        args = EngineArgs(path, dtype="float32", block_size=4, kv_cache_memory_bytes=budget, speculative_config=spec)
        return args.create_engine_config().cache.num_kv_blocks

    # Two main layers, then a third (the MTP layer's) on the same blocks.
    assert blocks(None) == 500 and blocks({"method": "mtp", "num_speculative_tokens": 1}) == 333
    assert blocks({"method": "ngram", "num_speculative_tokens": 1}) == 500
