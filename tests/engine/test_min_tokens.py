"""min_tokens holds back every stop condition: each EOS id the scheduler stops on (config.json,
generation_config.json, the tokenizer) in the worker's sampler, and stop strings in the detokenizer."""
from __future__ import annotations

from moelink.engine import LLM, SamplingParams

_ARGS = dict(dtype="float32", max_num_seqs=4, num_kv_blocks=64, max_model_len=256)


def test_min_tokens_holds_back_every_eos_the_scheduler_stops_on(tiny_model, tmp_path):
    # The scheduler stops on config.json ∪ generation_config.json ∪ tokenizer EOS ids;
    # the worker's sampler must hold back that same set under min_tokens, or an EOS
    # from generation_config.json is emitted mid-output and generation runs on past it.
    import json
    import shutil

    src = tiny_model("qwen3_e6k3")
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    base = LLM(src, **_ARGS).generate([[7, 8, 9]], greedy, use_tqdm=False)[0].outputs[0].token_ids
    eos = base[1]  # pretend the second greedy token is an EOS declared only in generation_config.json
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    gen = json.loads((dst / "generation_config.json").read_text()) if (dst / "generation_config.json").exists() else {}
    old = gen.get("eos_token_id", [])
    gen["eos_token_id"] = (old if isinstance(old, list) else [old]) + [eos]
    (dst / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(dst), **_ARGS)
    assert eos in llm.engine.eos_token_ids
    # Without min_tokens it stops on that EOS ...
    out = llm.generate([[7, 8, 9]], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base[:2] and out.finish_reason == "stop"
    # ... with min_tokens=5 the sampler must not pick it among the first 5 tokens.
    out = llm.generate([[7, 8, 9]], SamplingParams(temperature=0, max_tokens=8, min_tokens=5), use_tqdm=False)[0].outputs[0]
    assert eos not in out.token_ids[:5], out.token_ids


def test_stop_strings_ignored_until_min_tokens(tiny_model):
    # vLLM semantics (vllm-project/vllm#22014): min_tokens holds back every stop
    # condition, stop strings included; a stop string may end the request only
    # in text decoded after the first min_tokens tokens.
    from moelink.engine.core.output_processor import IncrementalDetokenizer
    from moelink.engine.core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_model("qwen3_e6k3"))
    text = "Hello, my name is Lee, and I'm a student in the college of engineering"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for min_tokens in (0, 3, 6):
        detok = IncrementalDetokenizer(tok, [], True, ["e"], False, min_tokens=min_tokens)
        out = "".join(detok.update([i]) for i in ids)
        start = len(tok.decode(ids[:min_tokens]))
        assert detok.stop_reason == "e"
        assert out == text[:text.index("e", start)], min_tokens

    llm = LLM(tiny_model("qwen3_e6k3"), **_ARGS)
    greedy = dict(temperature=0, max_tokens=12, ignore_eos=True)
    base = llm.generate([[7, 8, 9]], SamplingParams(**greedy), use_tqdm=False)[0].outputs[0]
    first = tok.decode(base.token_ids[:1])
    stop = first.strip()[:1]
    out = llm.generate([[7, 8, 9]], SamplingParams(stop=[stop], min_tokens=4, **greedy), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) > 4, (first, out)


def test_a_requests_samples_share_one_stop_set():
    """The n samples of a request share its stop_token_ids list (SamplingParams.sample copies shallowly): the engine
    builds their stop set once, not once per sample on the engine thread (issue 95 item 3), and a request with
    another list or ignore_eos gets its own."""
    from types import SimpleNamespace

    from moelink.engine.core.llm_engine import LLMEngine

    eng = SimpleNamespace(_eos_stop_ids=frozenset({5}), _stop_set=(None, False, frozenset()))
    params = SamplingParams(n=3, stop_token_ids=list(range(100, 1124)))
    sets = [LLMEngine._stop_ids(eng, params.sample(i)) for i in range(3)]
    assert sets[0] == frozenset(range(100, 1124)) | {5}
    assert sets[1] is sets[0] and sets[2] is sets[0]  # one set for the request
    other = SamplingParams(stop_token_ids=[7], ignore_eos=True)
    assert LLMEngine._stop_ids(eng, other) == frozenset({7})
