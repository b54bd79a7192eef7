"""Regression tests from a review of the request path (engine ↔ scheduler ↔ worker)."""
from __future__ import annotations

import asyncio
import time

import pytest

from moelink.engine import LLM, AsyncEngine, EngineArgs, SamplingParams
from moelink.engine.async_engine import EngineDeadError

_ARGS = dict(dtype="float32", max_num_seqs=4, num_kv_blocks=64, max_model_len=256)


def test_worker_forgets_requests_when_engine_goes_idle(tiny_model):
    # Finished ids reach the worker only with the next schedule(): the engine must
    # take that step even when nothing is left to run, or the worker keeps the
    # state (token lists, generators) of the last batch until the next request.
    llm = LLM(tiny_model("qwen3_e6k3"), **_ARGS)
    llm.generate([[1, 2, 3], [4, 5, 6]], SamplingParams(max_tokens=4, ignore_eos=True, seed=1), use_tqdm=False)
    runner = llm.engine.executor.runner
    assert runner.requests == {} and runner._parked_generators == {}
    assert not llm.engine.has_requests()


def test_async_engine_worker_forgets_aborted_request_when_idle(tiny_model):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_model("qwen3_e6k3"), **_ARGS))
    runner = engine.engine.executor.runner

    async def main():
        async for out in engine.generate("a", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True)):
            break  # walk away: aborted by the engine thread; nothing else runs after that
        for _ in range(200):
            if not runner.requests and not engine.engine.has_requests():
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
        assert runner.requests == {}
    finally:
        engine.shutdown()


def test_generate_after_shutdown_fails_instead_of_hanging(tiny_model):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_model("qwen3_e6k3"), **_ARGS))
    engine.shutdown()

    async def main():
        async def consume():
            return [o async for o in engine.generate("x", [1, 2, 3], SamplingParams(max_tokens=2))]
        return await asyncio.wait_for(consume(), 5)

    with pytest.raises(EngineDeadError, match="shut down"):
        asyncio.run(main())
    assert not engine.is_healthy


def test_consumer_loop_closed_does_not_kill_engine(tiny_model):
    # A client whose event loop is closed without finalizing its generator must
    # not take the engine thread (and every other request) down with it.
    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_model("qwen3_e6k3"), **_ARGS))
    try:
        loop = asyncio.new_event_loop()
        agen = engine.generate("gone", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
        loop.run_until_complete(agen.__anext__())
        loop.close()
        for _ in range(300):
            if not engine.engine.has_requests():
                break
            time.sleep(0.01)
        assert engine.is_healthy, engine.dead_error
        assert not engine.engine.has_unfinished_requests()  # the orphan was aborted, its blocks freed

        async def main():
            return [o async for o in engine.generate("ok", [4, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True))]

        outs = asyncio.run(main())
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    finally:
        engine.shutdown()


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
    from moelink.engine.detokenizer import IncrementalDetokenizer
    from moelink.engine.tokenizer import Tokenizer

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


def test_abort_output_carries_text_held_back_for_a_stop_string(tiny_model):
    """An aborted request's last output includes text the detokenizer was holding back."""
    from moelink.engine import LLM, SamplingParams
    from moelink.engine.outputs import OutputKind

    llm = LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=64, max_model_len=256)
    eng = llm.engine
    # A stop string that can never match but whose first character often starts the tail: the
    # detokenizer holds back up to len(stop) - 1 characters until it is sure.
    base = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop = base.text[-1] + "\x00never"
    eng.add_request("held", [5, 6, 7], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]),
                    OutputKind.CUMULATIVE)
    last = None
    while eng.has_unfinished_requests():
        outs = eng.step()
        last = outs[-1] if outs else last
        if last is not None and len(last.outputs[0].token_ids) == 12:
            break
    assert len(last.outputs[0].token_ids) == 12 and not last.finished
    assert last.outputs[0].text != base.text  # something is held back at this point
    (final,) = eng.abort_requests(["held"])
    assert final.outputs[0].text == base.text
    assert final.outputs[0].finish_reason == "abort"


def test_duplicate_request_id_refused_even_if_routed_to_another_rank(tiny_model):
    from moelink.engine import LLM, SamplingParams

    llm = LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=64, max_model_len=256)
    eng = llm.engine
    req = eng.process_inputs("dup", [1, 2, 3], SamplingParams(max_tokens=4))
    eng.add_processed(req)
    with pytest.raises(ValueError, match="request_id='dup'"):
        eng.add_processed(eng.process_inputs("dup", [9] * 30, SamplingParams(max_tokens=4)))
    eng.abort_requests(["dup"])


def test_reusing_an_id_right_after_cancel_gets_only_its_own_outputs(tiny_model):
    """A caller that stops a stream and immediately reuses its id must not see the old request's
    late tokens or its abort (the abort is still queued when the new stream registers)."""
    import asyncio

    from moelink.engine import AsyncEngine, EngineArgs, SamplingParams

    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_model("qwen3_e6k3"), dtype="float32",
                                                     num_kv_blocks=64, max_model_len=256))

    async def main():
        for round_ in range(20):
            old = engine.generate("same", [1, 2, 3], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
            async for _ in old:
                break
            await old.aclose()
            outs = [o async for o in engine.generate("same", [4, 5], SamplingParams(max_tokens=6, temperature=0,
                                                                                    ignore_eos=True))]
            last = outs[-1].outputs[0]
            assert last.finish_reason == "length" and len(last.token_ids) == 6, (round_, last)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_request_state_block_array_grows_with_the_block_list():
    """The runner copies each request's block table from an int32 array with spare room; appending past
    its capacity must keep every id (a 1-block request growing to 40 blocks, in uneven steps)."""
    from moelink.engine.model_runner import CachedRequestState
    from moelink.engine.sampling_params import SamplingParams

    st = CachedRequestState("r", [1, 2, 3], [], SamplingParams(), [7], 0, None)
    want = [7]
    nxt = 100
    for k in (1, 3, 0, 9, 2, 17, 7):
        new = list(range(nxt, nxt + k))
        nxt += k
        if new:
            st.add_blocks(new)
        want += new
        assert st.block_ids == want and st.block_arr[: len(want)].tolist() == want
    assert len(want) == 40 and len(st.block_arr) >= 40
