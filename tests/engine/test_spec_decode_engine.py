"""Speculative decoding end to end (one rank): greedy outputs with a drafter are token-identical to decoding
without one, with chunked prefill, preemption and prefix caching in play; seeded sampling is reproducible;
requests the drafter leaves alone (penalties, logprobs) decode exactly as without speculation."""
from __future__ import annotations

import functools
import random

import pytest

from prometheus_client import generate_latest

from moelink.engine import LLM, SamplingParams
from moelink.engine.core.metrics import EngineMetrics

from moelink.benchmarks.spec_decode import OracleDrafter


def _prompts(vocab: int, n: int = 24, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 3 == 0:  # repetitive: the n-gram drafter finds its matches here
            unit = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 5))]
            out.append((unit * 12)[: rng.randint(8, 40)])
        else:
            out.append([rng.randrange(3, vocab) for _ in range(rng.randint(3, 60))])
    return out


def _llm(path: str, spec=None, **kw) -> LLM:
    args = dict(dtype="float32", max_model_len=256, max_num_batched_tokens=48, num_kv_blocks=kw.pop("blocks", 96),
                block_size=4, enable_prefix_caching=True, speculative_config=spec)
    args.update(kw)
    return LLM(path, **args)


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(tiny_model):
    path = tiny_model("qwen3_e6k3")
    with _llm(path) as llm:
        prompts = _prompts(llm.engine.config.model.vocab_size)
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        want = _tokens(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
    return path, prompts, params, want


@pytest.mark.parametrize("drafter", ["ngram", "oracle"])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_greedy_output_with_a_drafter_equals_plain_decoding(reference, drafter):
    path, prompts, params, want = reference
    if drafter == "ngram":
        spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}'
    else:  # right with probability 0.7, wrong otherwise: acceptance and rejection both in play
        ref = {tuple(p): w for p, w in zip(prompts, want)}
        spec = {"method": "ngram", "num_speculative_tokens": 3,
                "drafter_factory": functools.partial(OracleDrafter, ref, 0.7, vocab=64, seed=1)}
    with _llm(path, spec, blocks=40) as llm:  # a small pool: preemptions happen
        got = _tokens(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
        stats = llm.engine.stats()
        metrics = EngineMetrics()
        metrics.attach(llm.engine)
        scrape = generate_latest(metrics.registry).decode()
    assert got == want
    sd = stats.spec_decode
    assert f"moelink_spec_decode_num_accepted_tokens_total {float(sd.num_accepted_tokens)}" in scrape
    assert 'moelink_spec_decode_num_accepted_tokens_per_pos_total{position="0"}' in scrape
    assert sd is not None and sd.num_accepted_tokens > 0 and sd.mean_accepted_length > 1.0
    if drafter == "oracle":
        assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0
        assert 0.5 < sd.acceptance_rate < 0.9


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_seeded_sampling_with_speculation_is_reproducible(reference):
    path, prompts, _, want = reference
    ref = {tuple(p): w for p, w in zip(prompts, want)}
    spec = {"method": "ngram", "num_speculative_tokens": 2,
            "drafter_factory": functools.partial(OracleDrafter, ref, 0.8, vocab=64, seed=2)}
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=100 + i, max_tokens=16, ignore_eos=True)
              for i in range(len(prompts))]
    runs = []
    for _ in range(2):
        with _llm(path, spec) as llm:
            runs.append(_tokens(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)))
    assert runs[0] == runs[1]


def test_penalties_and_logprobs_apply_at_every_verified_position(reference):
    """Greedy with repetition / frequency / presence penalties (each position's counts include the drafts before
    it) and logprobs (of each emitted token): the same tokens and logprobs as without speculation."""
    path, prompts, _, _ = reference
    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, presence_penalty=2.0, frequency_penalty=2.0),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, frequency_penalty=0.6,
                             presence_penalty=0.4, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=False, min_tokens=10)]
    batch = [{"prompt_token_ids": prompts[i]} for i in range(len(params))]
    with _llm(path) as plain:
        want = plain.generate(batch, params, use_tqdm=False)
    ref = {tuple(prompts[i]): want[i].outputs[0].token_ids for i in range(len(params))}
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, ref, 0.7, vocab=64, seed=3)}
    with _llm(path, spec) as llm:
        got = llm.generate(batch, params, use_tqdm=False)
        sd = llm.engine.stats().spec_decode
    assert _tokens(got) == _tokens(want)
    assert sd.num_accepted_tokens > 0 and sd.num_draft_tokens > sd.num_accepted_tokens
    for g, w in zip(got[2:4], want[2:4]):
        assert len(g.outputs[0].logprobs) == 16
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert lg.keys() == lw.keys()
            for t in lw:
                assert abs(lg[t].logprob - lw[t].logprob) < 1e-4 and lg[t].rank == lw[t].rank


def test_bad_speculative_configs_are_refused(reference):
    path = reference[0]
    with pytest.raises(ValueError, match="num_speculative_tokens=9 is invalid"):
        _llm(path, '{"method": "ngram", "num_speculative_tokens": 9}')
    with pytest.raises(ValueError, match="method='mtp' is invalid for this checkpoint: its config.json has "
                                         "num_nextn_predict_layers=0"):  # Qwen3-MoE ships no MTP layers
        _llm(path, {"method": "mtp", "num_speculative_tokens": 1})
    # eagle3 runs now (tests/engine/test_spec_decode_eagle3.py): a head path that is not there is refused by name.
    with pytest.raises(ValueError, match="speculative_config.model='/nowhere' is neither a local directory"):
        _llm(path, {"method": "eagle3", "model": "/nowhere", "num_speculative_tokens": 1})


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_grammar_masks_apply_at_every_verified_position():
    """Structured output with drafts: each verified position gets the grammar's mask after the drafts before it
    (a draft the grammar refuses is rejected), so greedy outputs equal decoding without speculation and match; the
    logprobs of each verified position are of the masked distribution, as without speculation (sampler.py)."""
    import json
    from pathlib import Path

    pytest.importorskip("xgrammar")
    from moelink.engine.contract.structured_output_params import StructuredOutputParams

    builtin = str(Path(__file__).resolve().parents[2] / "builtin-model")
    schema = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["color", "n"], "additionalProperties": False}
    kinds = [StructuredOutputParams(json=schema), StructuredOutputParams(regex=r"[a-c]{3}-[0-9]{2}"),
             StructuredOutputParams(choice=["alpha beta", "gamma delta"])]
    prompts = ["The answer is", "def main():", "x = 1"]
    params = [SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=so, logprobs=3) for so in kinds]
    kw = dict(dtype="float32", max_model_len=256, num_kv_blocks=64)
    with LLM(builtin, **kw) as plain:
        want = plain.generate(prompts, params, use_tqdm=False)
        ids = [plain.engine.tokenizer.encode(p) for p in prompts]
        vocab = plain.engine.config.model.vocab_size
    ref = {tuple(i): w.outputs[0].token_ids for i, w in zip(ids, want)}
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, ref, 0.6, vocab=vocab, seed=4)}
    with LLM(builtin, speculative_config=spec, **kw) as llm:
        got = llm.generate(prompts, params, use_tqdm=False)
        sd = llm.engine.stats().spec_decode
    assert _tokens(got) == _tokens(want)
    assert sd.num_accepted_tokens > 0 and sd.num_draft_tokens > sd.num_accepted_tokens
    assert set(json.loads(got[0].outputs[0].text)) == {"color", "n"}
    for g, w in zip(got, want):
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert lg.keys() == lw.keys()
            for t in lg:
                assert lg[t].rank == lw[t].rank
                assert lg[t].logprob == pytest.approx(lw[t].logprob, abs=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "dsv3", "glm", "gpt_oss"])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_greedy_with_drafts_equals_plain_decoding_across_families(tiny_model, hf_tiny_model, tmp_path, family):
    """Mixtral, DeepSeek-V3 (MLA), GLM-4-MoE and gpt-oss (sliding-window layers, sinks): greedy outputs with a
    drafter that is right 60 % of the time equal decoding without one, chunked prefill and preemption in play."""
    if family == "gpt_oss":
        from tests.helpers.gpt_oss_checkpoints import gpt_oss_config

        gpt_oss_config().save_pretrained(tmp_path)
        # save_pretrained writes the config only: a dummy load makes the weights from it.
        path, extra = str(tmp_path), dict(load_format="dummy")
    else:
        path = {"mixtral": lambda: tiny_model("mixtral_e5k3"), "dsv3": lambda: hf_tiny_model("dsv3_lora"),
                "glm": lambda: hf_tiny_model("glm_bias")}[family]()
        extra = {}
    kw = dict(dtype="float64", max_model_len=128, max_num_batched_tokens=24, num_kv_blocks=16, block_size=4, **extra)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, detokenize=False)
    with LLM(path, **kw) as plain:
        vocab = plain.engine.config.model.vocab_size
        rng = random.Random(11)
        prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 28))] for _ in range(8)]
        want = _tokens(plain.generate(prompts, params, use_tqdm=False))
    ref = {tuple(p): w for p, w in zip(prompts, want)}
    spec = {"method": "ngram", "num_speculative_tokens": 2,
            "drafter_factory": functools.partial(OracleDrafter, ref, 0.6, vocab=vocab, seed=6)}
    with LLM(path, speculative_config=spec, **kw) as llm:
        got = _tokens(llm.generate(prompts, params, use_tqdm=False))
        stats = llm.engine.stats()
    assert got == want
    assert stats.spec_decode.num_accepted_tokens > 0 and stats.num_preemptions_total > 0


def test_bench_serve_reads_each_levels_acceptance_from_the_metrics_endpoint(reference):
    """`moelink bench-serve --metrics-url` (benchmarks/spec_metrics.py): two scrapes of a live /metrics endpoint
    around some work give exactly the engine's own counters for that work."""
    from moelink.benchmarks.spec_metrics import level_delta, scrape
    from moelink.engine.core.metrics import start_metrics_server

    path, prompts, params, want = reference
    ref = {tuple(p): w for p, w in zip(prompts, want)}
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, ref, 0.7, vocab=64, seed=8)}
    with _llm(path, spec) as llm:
        metrics = EngineMetrics()
        metrics.attach(llm.engine)
        httpd = start_metrics_server(metrics.registry, "127.0.0.1", 0)
        try:
            url = f"http://127.0.0.1:{httpd.server_port}/metrics"
            assert scrape(url) is None  # nothing verified yet: no spec-decode series
            llm.generate([{"prompt_token_ids": p} for p in prompts[:6]], params, use_tqdm=False)
            before = scrape(url)
            first = llm.engine.stats().spec_decode.copy()
            llm.generate([{"prompt_token_ids": p} for p in prompts[6:]], params, use_tqdm=False)
            after = scrape(url)
            total = llm.engine.stats().spec_decode
        finally:
            httpd.close()
    assert (after["drafts"], after["draft_tokens"], after["accepted_tokens"]) == (
        total.num_verify_rows, total.num_draft_tokens, total.num_accepted_tokens)
    d = level_delta(before, after)
    rows = total.num_verify_rows - first.num_verify_rows
    accepted = total.num_accepted_tokens - first.num_accepted_tokens
    assert d["verify_rows"] == rows and d["accepted_tokens"] == accepted
    assert abs(d["mean_accepted_length"] - (1 + accepted / rows)) < 1e-12
    assert len(d["acceptance_per_position"]) == 3 and d["acceptance_per_position"][0] >= d["acceptance_per_position"][2]
