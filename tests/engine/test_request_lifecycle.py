"""A request's life on the request path (engine ↔ scheduler ↔ worker): when it ends, by finishing, an
abort, a consumer that walks away or a shut-down engine, the worker forgets its state and its last output
carries all its text; its id is its own. (The server-level counterpart: tests/server/test_request_ids.py.)"""
from __future__ import annotations

import asyncio

import pytest

from moelink.engine import LLM, AsyncEngine, EngineArgs, SamplingParams
from moelink.engine.api.async_engine import EngineDeadError

from tests.helpers.engine_steps import EngineSteps

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
    steps = EngineSteps(engine.engine)

    async def main():
        async for out in engine.generate("a", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True)):
            break  # walk away: aborted by the engine thread; nothing else runs after that
        # (The loop keeps running meanwhile: it finalizes the abandoned generator, which aborts it.)
        await asyncio.to_thread(steps.wait_for, lambda: not runner.requests and not engine.engine.has_requests(), 10,
                                "the engine to go idle and the worker to forget the aborted request")

    try:
        asyncio.run(main())
        assert runner.requests == {}
    finally:
        engine.shutdown()


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
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
    steps = EngineSteps(engine.engine)
    try:
        loop = asyncio.new_event_loop()
        agen = engine.generate("gone", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
        loop.run_until_complete(agen.__anext__())
        loop.close()
        steps.wait_for(lambda: not engine.engine.has_requests(), 10, "the engine to abort the orphaned request")
        assert engine.is_healthy, engine.dead_error
        assert not engine.engine.has_unfinished_requests()  # the orphan was aborted, its blocks freed

        async def main():
            return [o async for o in engine.generate("ok", [4, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True))]

        outs = asyncio.run(main())
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    finally:
        engine.shutdown()


def test_abort_output_carries_text_held_back_for_a_stop_string(tiny_model):
    """An aborted request's last output includes text the detokenizer was holding back."""
    from moelink.engine import LLM, SamplingParams
    from moelink.engine.core.outputs import OutputKind

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
    from moelink.engine.rank.model_runner import CachedRequestState
    from moelink.engine.contract.sampling_params import SamplingParams

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
