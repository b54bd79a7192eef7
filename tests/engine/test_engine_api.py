"""LLM / AsyncEngine behaviour: seeds, validation errors, aborts, stops — and nothing leaks."""
from __future__ import annotations

import asyncio
import json
import random
import shutil

import pytest

from moelink.engine import LLM, AsyncEngine, EngineArgs, SamplingParams

from tests.helpers.engine_steps import EngineSteps


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("qwen3_e6k3"), dtype="float32", max_num_seqs=16, max_num_batched_tokens=96,
               num_kv_blocks=128, max_model_len=512)


def _free(llm: LLM) -> bool:
    s = llm.engine.stats()
    return s.num_free_blocks == s.num_total_blocks and not llm.engine.has_unfinished_requests()


@pytest.mark.slow
def test_seeded_request_same_alone_and_in_batch(llm):
    rng = random.Random(0)
    target = [rng.randrange(500) for _ in range(37)]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [[rng.randrange(500) for _ in range(rng.randint(1, 90))] for _ in range(15)]
    other_params = [SamplingParams(temperature=1.0, seed=(i if i % 2 else None), max_tokens=rng.randint(4, 30), ignore_eos=True)
                    for i in range(15)]
    batch = llm.generate(others[:7] + [target] + others[7:], other_params[:7] + [params] + other_params[7:], use_tqdm=False)
    assert batch[7].outputs[0].token_ids == alone
    assert len(set(map(tuple, (o.outputs[0].token_ids for o in batch)))) > 8  # sampling really varied
    assert _free(llm)


def test_outputs_shape_and_text(llm):
    out = llm.generate("hello world", SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert len(comp.token_ids) == 5 and comp.finish_reason == "length"
    assert comp.text == llm.get_tokenizer().decode(comp.token_ids)
    assert len(comp.logprobs) == 5 and all(tid in lp for tid, lp in zip(comp.token_ids, comp.logprobs))
    assert all(len(lp) in (3, 4) for lp in comp.logprobs)
    assert out.prompt == "hello world" and out.prompt_token_ids == llm.get_tokenizer().encode("hello world")


def test_a_finished_output_says_when_it_was_first_scheduled_and_the_deferred_text_is_the_streamed_one(llm):
    """The last output's metrics carry the scheduler's first-schedule time and preemptions (vLLM's phase metrics);
    LLM.generate's text (decoded once at the end: no stop strings) equals a stream's joined deltas."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    out = llm.generate("hello world", params, use_tqdm=False)[0]
    m = out.metrics
    assert m["arrival_time"] <= m["scheduled_time"] <= m["first_token_time"] and m["num_preemptions"] == 0
    from moelink.engine.core.outputs import OutputKind
    eng = llm.engine
    eng.add_request("streamed", llm.get_tokenizer().encode("hello world"), params, output_kind=OutputKind.DELTA)
    deltas = []
    while eng.has_requests():
        deltas += [o.outputs[0].text for o in eng.step() if o.request_id == "streamed"]
    assert "".join(deltas) == out.outputs[0].text and out.outputs[0].text
    assert _free(llm)


def test_detokenize_false_gives_the_same_tokens_and_no_text(llm):
    """Token ids only (what the smg gateway asks for): same ids and logprob values, empty text, no token texts."""
    kw = dict(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True)
    want = llm.generate([[5, 6, 7]], SamplingParams(**kw), use_tqdm=False)[0].outputs[0]
    got = llm.generate([[5, 6, 7]], SamplingParams(**kw, detokenize=False), use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids and got.text == "" and want.text
    assert [{t: v.logprob for t, v in d.items()} for d in got.logprobs] == \
           [{t: v.logprob for t, v in d.items()} for d in want.logprobs]
    assert all(v.decoded_token is None for d in got.logprobs for v in d.values())
    assert _free(llm)


def test_stop_string_and_stop_token(llm):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    base = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0]
    # Stop on a token that appears mid-way; then on a string from the middle of the text.
    stop_tok = base.token_ids[5]
    first = base.token_ids.index(stop_tok)
    o = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[stop_tok]),
                     use_tqdm=False)[0].outputs[0]
    assert o.token_ids == base.token_ids[: first + 1] and o.finish_reason == "stop" and o.stop_reason == stop_tok
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    if stop.strip():
        o = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]),
                         use_tqdm=False)[0].outputs[0]
        assert o.finish_reason == "stop" and o.stop_reason == stop
        assert o.text == text[: text.index(stop)]
    assert _free(llm)


BAD_INPUTS = [
    ("", None, "prompt"),
    ([], None, "prompt"),
    ([1] * 600, None, "max_model_len"),
    ([1, 2, 100000], None, "prompt_token_ids[2]"),
    ([1, 2, -1], None, "prompt_token_ids[2]"),
]


@pytest.mark.parametrize("prompt,params,field", BAD_INPUTS)
def test_bad_prompts_raise_and_leak_nothing(llm, prompt, params, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        llm.generate(["a fine prompt", prompt], params, use_tqdm=False)
    assert _free(llm)


def test_max_tokens_beyond_the_context_is_capped_offline_and_refused_by_the_servers(llm):
    """vLLM's offline LLM generates up to the context where prompt + max_tokens > max_model_len (its scheduler
    stops the request at max_model_len, finish_reason "length"); its OpenAI server answers 400, and so do the
    servers' intake (engine.process_inputs) here. Unset max_tokens means "up to the context" for both."""
    msg = (r"SamplingParams\.max_tokens=13 is too large: this model's maximum context length is 512 tokens and the "
           r"prompt_token_ids has 500 tokens \(13 > 512 - 500\); ask for at most 12")
    with pytest.raises(ValueError, match=msg):
        llm.engine.process_inputs("too-long", [1] * 500, SamplingParams(max_tokens=13))
    capped = llm.generate([[1] * 500], SamplingParams(max_tokens=13, ignore_eos=True, temperature=0),
                         use_tqdm=False)[0].outputs[0]
    assert len(capped.token_ids) == 12 and capped.finish_reason == "length"
    exact = llm.generate([[1] * 500], SamplingParams(max_tokens=12, ignore_eos=True, temperature=0),
                         use_tqdm=False)[0].outputs[0]
    assert exact.token_ids == capped.token_ids and exact.finish_reason == "length"
    unset = llm.generate([[1] * 505], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(unset.token_ids) == 7 and unset.finish_reason == "length"
    assert _free(llm)


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(min_p=2.0), "min_p"),
    (dict(logprobs=-1), "logprobs"), (dict(detokenize=0), "detokenize"),
    (dict(detokenize=False, stop=["."]), "detokenize"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_bad_model_directories(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="model="):
        LLM(str(tmp_path / "nope"))
    src = tiny_model("mixtral_e8k2")
    # An unsupported architecture.
    bad_arch = tmp_path / "arch"
    shutil.copytree(src, bad_arch)
    cfg = json.loads((bad_arch / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (bad_arch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architectures"):
        LLM(str(bad_arch))
    # A checkpoint missing one expert tensor.
    from safetensors.torch import load_file, save_file

    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    for f in missing.glob("*.safetensors"):
        tensors = load_file(str(f))
        tensors = {k: v for k, v in tensors.items() if "experts.3.w2" not in k}
        save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.\d\.block_sparse_moe\.experts\.3\.w2\.weight'"):
        LLM(str(missing))


def test_engine_args_validation(tiny_model):
    with pytest.raises(ValueError, match="num_kv_blocks"):
        EngineArgs(model="x", num_kv_blocks=0)
    with pytest.raises(ValueError, match="dtype"):
        LLM(tiny_model("mixtral_e8k2"), dtype="int8")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_model("mixtral_e8k2"), max_model_len=10**6)


def test_async_generate_abort_and_cancel_free_everything(tiny_model):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_model("qwen3_e6k3"), dtype="float32",
                                                     max_num_seqs=8, num_kv_blocks=96, max_model_len=512))
    steps = EngineSteps(engine.engine)

    streaming = asyncio.Event()  # the task cancelled from outside has its first output: it is mid-stream

    async def run_one(i: int, mode: str):
        params = SamplingParams(max_tokens=60, temperature=0.8, seed=i, ignore_eos=True)
        got = []
        async for out in engine.generate(f"r{i}", [1 + i, 2, 3] * (i + 1), params):
            got.append(out)
            if i == 99:
                streaming.set()
            if mode == "abort" and len(got) == 3:
                await engine.abort(f"r{i}")
            if mode == "break" and len(got) == 4:
                break  # consumer walks away: the engine must abort it
        return got

    async def main():
        modes = ["full", "abort", "break", "full", "abort", "break", "full", "full", "break", "abort"]
        tasks = [asyncio.create_task(run_one(i, m)) for i, m in enumerate(modes)]
        # And one task cancelled from outside while it waits.
        cancelled = asyncio.create_task(run_one(99, "full"))
        await asyncio.wait_for(streaming.wait(), 60)
        cancelled.cancel()
        results = await asyncio.gather(*tasks)
        for mode, got in zip(modes, results):
            last = got[-1].outputs[0]
            if mode == "full":
                assert last.finish_reason == "length" and len(last.token_ids) == 60
            elif mode == "abort":
                assert last.finish_reason == "abort"
        with pytest.raises(ValueError, match="prompt"):
            async for _ in engine.generate("bad", "", None):
                pass
        # Aborts and cancels are applied by the engine thread within a step.
        def idle():
            s = engine.stats()
            return s.num_free_blocks == s.num_total_blocks and s.num_running == 0 and s.num_waiting == 0

        await asyncio.to_thread(steps.wait_for, idle, 10, "every block free and no request left")
        s = engine.stats()
        assert s.num_free_blocks == s.num_total_blocks, s

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert engine.engine.output_processor.states == {}


def test_shutdown_frees_the_model_while_the_llm_is_still_held(tiny_model):
    """`with LLM(...) as llm:` keeps `llm` bound after the block: shutdown itself must drop the model and KV cache,
    or the next engine on the same GPU finds no memory (spec_decode on an H200, 2026-11-26)."""
    import gc
    import weakref

    llm = LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=16, max_model_len=64)
    model = weakref.ref(llm.engine.executor.runner.model)
    kv = [weakref.ref(t) for t in llm.engine.executor.runner.kv_caches[0]]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.shutdown()
    gc.collect()
    assert model() is None, "the engine still holds its model after shutdown"
    assert all(r() is None for r in kv)
    llm.shutdown()  # idempotent
