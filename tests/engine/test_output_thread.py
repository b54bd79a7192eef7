"""AsyncEngine's output thread (engine/api/output_thread.py): the output work runs on "moelink-output", beside the
engine thread's steps; a stop string it finds ends the request in the scheduler too; an abort's final output
comes after the tokens queued before it; its failure kills the engine; a consumer that blocks it stops the
engine thread after MAX_QUEUED_STEPS step batches instead of letting the queue grow."""
from __future__ import annotations

import asyncio
import threading

import pytest

from moelink.engine import AsyncEngine, EngineArgs, SamplingParams
from moelink.engine.api.async_engine import EngineDeadError
from moelink.engine.api.output_thread import MAX_QUEUED_STEPS
from moelink.engine.core.outputs import OutputKind

from tests.helpers.engine_steps import EngineSteps
from tests.helpers.waits import WaitTimeout, join_threads, wait_event, wait_until

_ARGS = dict(dtype="float32", max_num_seqs=4, num_kv_blocks=64, max_model_len=256)
_GREEDY = dict(temperature=0.0, ignore_eos=True)


class _HeldOutputs:
    """Wraps the engine's OutputProcessor.process: records the threads that call it and, until `release()`,
    holds the first call in it (a consumer that blocks the output thread)."""

    def __init__(self, engine: AsyncEngine, hold: bool = True):
        processor = engine.engine.output_processor
        self._process = processor.process
        self.entered, self._go = threading.Event(), threading.Event()
        if not hold:
            self._go.set()
        self.threads: set[str] = set()
        processor.process = self

    def __call__(self, core_outputs):
        self.threads.add(threading.current_thread().name)
        if not self._go.is_set():
            self.entered.set()
            self._go.wait(30)
        return self._process(core_outputs)

    def release(self) -> None:
        self._go.set()


class _BlockingSink:
    """A metrics sink that blocks the output thread at its first outputs until `release()`."""

    def __init__(self):
        self.entered, self._go = threading.Event(), threading.Event()
        self.threads: set[str] = set()

    def attach(self, engine) -> None:
        pass

    def on_outputs(self, outputs) -> None:
        self.threads.add(threading.current_thread().name)
        if not self._go.is_set():
            self.entered.set()
            self._go.wait(30)

    def release(self) -> None:
        self._go.set()


def _engine(tiny_model, metrics=None, **kw) -> AsyncEngine:
    return AsyncEngine.from_engine_args(EngineArgs(model=tiny_model("qwen3_e6k3"), **_ARGS, **kw), metrics=metrics)


async def _all(engine: AsyncEngine, rid: str, prompt, params, kind=OutputKind.DELTA) -> list:
    return [o async for o in engine.generate(rid, prompt, params, kind)]


def _idle(engine: AsyncEngine) -> bool:
    s = engine.stats()
    return s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks


def test_output_work_runs_on_the_output_thread(tiny_model):
    sink = _BlockingSink()
    sink.release()
    engine = _engine(tiny_model, metrics=sink)
    held = _HeldOutputs(engine, hold=False)
    try:
        outs = asyncio.run(asyncio.wait_for(_all(engine, "a", [1, 2, 3], SamplingParams(max_tokens=8, **_GREEDY)), 60))
        assert outs[-1].finished and sum(len(o.outputs[0].token_ids) for o in outs) == 8
        assert held.threads == {"moelink-output"} and sink.threads == {"moelink-output"}
    finally:
        engine.shutdown()


def test_a_steps_outputs_wake_the_consumers_loop_once(tiny_model):
    """Four streams on one event loop: each step's outputs reach their queues through one call_soon_threadsafe (one
    wake-up of the loop, not one a token), in the engine's order, every token delivered."""
    from moelink.engine.api import output_thread

    engine = _engine(tiny_model)
    calls: list[int] = []

    async def run():
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counted(callback, *args, **kw):
            if callback is output_thread._put_each:
                calls.append(len(args[0]))
            return real(callback, *args, **kw)
        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        params = SamplingParams(max_tokens=6, **_GREEDY)
        return await asyncio.gather(*(_all(engine, f"s{i}", [1, 2, 3 + i], params) for i in range(4)))

    try:
        outs = asyncio.run(asyncio.wait_for(run(), 60))
        assert [sum(len(o.outputs[0].token_ids) for o in stream) for stream in outs] == [6] * 4
        assert all(stream[-1].finished for stream in outs)
        assert sum(calls) == sum(len(stream) for stream in outs)  # every output went through the batched put
        assert max(calls) > 1 and len(calls) < sum(calls)  # a step's outputs shared one wake-up
    finally:
        engine.shutdown()


def _token_stop(engine: AsyncEngine, ids: list[int]) -> tuple[str, int]:
    """A stop string that first appears in the text of token k (k >= 2, small): that token's own text."""
    tok = engine.tokenizer
    for k in range(2, 8):
        before, text = tok.decode(ids[: k - 1]), tok.decode(ids[:k])
        added = text[len(before):]
        if text.startswith(before) and added.strip() and added not in before:
            return added, k
    pytest.skip("no token among the first ones adds text of its own")


def test_stop_string_finishes_the_request_in_the_scheduler_and_streams_nothing_after_it(tiny_model):
    engine = _engine(tiny_model)
    pool = engine.engine.schedulers[0].kv.pool
    free_at_start = pool.num_free_blocks
    steps = EngineSteps(engine.engine)
    try:
        base = asyncio.run(asyncio.wait_for(_all(engine, "base", [5, 6, 7], SamplingParams(max_tokens=40, **_GREEDY),
                                                 OutputKind.CUMULATIVE), 60))[-1].outputs[0]
        stop, k = _token_stop(engine, base.token_ids)
        # The output thread is held at the first token until the engine has run MAX_QUEUED_STEPS steps ahead: the
        # tokens after the stop string are produced (and queued) before the stop is found, and must be dropped.
        held = _HeldOutputs(engine)

        async def main():
            run = asyncio.ensure_future(_all(engine, "s", [5, 6, 7], SamplingParams(max_tokens=200, stop=[stop],
                                                                                    **_GREEDY)))
            await asyncio.to_thread(wait_event, held.entered, 30, "the output thread at the first token")
            await asyncio.to_thread(steps.wait_for, lambda: engine._outputs.queued_steps == MAX_QUEUED_STEPS, 30,
                                    "the engine thread to fill the output queue")
            held.release()
            return await asyncio.wait_for(run, 60)

        outs = asyncio.run(main())
        ids = [t for o in outs for t in o.outputs[0].token_ids]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        last = outs[-1].outputs[0]
        assert last.finish_reason == "stop" and last.stop_reason == stop
        assert ids == base.token_ids[:k], (ids, base.token_ids[:k + MAX_QUEUED_STEPS])
        assert "".join(o.outputs[0].text for o in outs) == base.text[: base.text.index(stop)]
        # The engine thread finished it too: out of the scheduler, every KV block back in the pool.
        steps.wait_for(lambda: "s" not in engine.engine.schedulers[0].requests and pool.num_free_blocks == free_at_start,
                       10, "the stopped request to leave the scheduler and give its blocks back")
        assert not engine.engine.has_unfinished_requests() and engine.is_healthy
    finally:
        engine.shutdown()
    assert engine.engine.output_processor.states == {}


def test_abort_while_tokens_are_queued_gives_one_final_output_after_them(tiny_model):
    engine = _engine(tiny_model)
    steps = EngineSteps(engine.engine)
    held = _HeldOutputs(engine)

    async def main():
        outs = []

        async def consume():
            async for o in engine.generate("a", [1, 2, 3], SamplingParams(max_tokens=200, **_GREEDY)):
                outs.append(o)

        run = asyncio.ensure_future(consume())
        await asyncio.to_thread(wait_event, held.entered, 30, "the output thread at the first token")
        await asyncio.to_thread(steps.wait_for, lambda: engine._outputs.queued_steps == MAX_QUEUED_STEPS, 30,
                                "the engine thread to fill the output queue")
        await engine.abort("a")  # queued behind MAX_QUEUED_STEPS steps of tokens not yet delivered
        held.release()
        await asyncio.wait_for(run, 60)
        return outs

    try:
        outs = asyncio.run(main())
        finals = [o for o in outs if o.finished]
        assert len(finals) == 1 and outs[-1] is finals[0]
        final = finals[0].outputs[0]
        assert final.finish_reason == "abort"
        # Cumulative: the abort's output carries every token streamed before it, the queued ones included.
        assert final.token_ids == outs[-2].outputs[0].token_ids and len(final.token_ids) > MAX_QUEUED_STEPS
        steps.wait_for(lambda: _idle(engine), 10, "the aborted request's blocks back in the pool")
    finally:
        engine.shutdown()
    assert engine.engine.output_processor.states == {}


def test_an_output_thread_error_fails_every_stream_and_the_engine(tiny_model):
    engine = _engine(tiny_model)
    processor = engine.engine.output_processor
    real, calls = processor.process, []

    def process(core_outputs):
        calls.append(len(core_outputs))
        if len(calls) == 4:
            raise RuntimeError("detokenizer exploded")
        return real(core_outputs)

    processor.process = process

    async def one(i):
        try:
            await _all(engine, f"r{i}", [1 + i, 2, 3], SamplingParams(max_tokens=200, **_GREEDY))
        except EngineDeadError as exc:
            return exc
        raise AssertionError(f"r{i} finished although the output thread failed")

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(3))), 60)

    try:
        errors = asyncio.run(main())
        assert all("output thread failed" in str(e) and "detokenizer exploded" in str(e) for e in errors), errors
        assert not engine.is_healthy and "detokenizer exploded" in str(engine.dead_error)
        # The engine thread ends too, freeing every request's KV blocks; new requests are refused at once.
        join_threads([engine._thread], 10, "the engine thread to end after the output thread failed")
        assert _idle(engine) and not engine.engine.has_unfinished_requests()
        with pytest.raises(EngineDeadError):
            asyncio.run(asyncio.wait_for(_all(engine, "late", [1, 2], SamplingParams(max_tokens=2)), 10))
    finally:
        engine.shutdown(timeout=10)
    assert not engine._thread.is_alive() and not engine._output.is_alive()


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_a_blocked_consumer_stops_the_engine_thread_after_the_bound(tiny_model):
    # A step timeout far below the time the consumer blocks: waiting for the consumer is no hung step.
    sink = _BlockingSink()
    engine = _engine(tiny_model, metrics=sink, step_timeout=1.0)
    steps = EngineSteps(engine.engine)

    async def main():
        run = asyncio.ensure_future(_all(engine, "a", [1, 2, 3], SamplingParams(max_tokens=100, **_GREEDY)))
        await asyncio.to_thread(wait_event, sink.entered, 30, "the output thread in the blocked consumer")
        await asyncio.to_thread(steps.wait_for, lambda: engine._outputs.queued_steps == MAX_QUEUED_STEPS, 30,
                                "the engine thread to fill the output queue")
        started = steps.started
        with pytest.raises(WaitTimeout):  # the engine thread waits for room: no step starts
            await asyncio.to_thread(steps.wait_for, lambda: steps.started > started, 2.5, "another step")
        assert engine._outputs.queued_steps == MAX_QUEUED_STEPS and engine.is_healthy, engine.dead_error
        sink.release()
        return await asyncio.wait_for(run, 60)

    try:
        outs = asyncio.run(main())
        assert outs[-1].outputs[0].finish_reason == "length"
        assert sum(len(o.outputs[0].token_ids) for o in outs) == 100
    finally:
        engine.shutdown()


def test_shutdown_with_a_blocked_consumer_delivers_the_aborts_and_ends_both_threads(tiny_model):
    sink = _BlockingSink()
    engine = _engine(tiny_model, metrics=sink)
    steps = EngineSteps(engine.engine)
    done = threading.Event()

    async def main():
        outs = []

        async def consume():
            async for o in engine.generate("a", [1, 2, 3], SamplingParams(max_tokens=200, **_GREEDY)):
                outs.append(o)

        run = asyncio.ensure_future(consume())
        await asyncio.to_thread(wait_event, sink.entered, 30, "the output thread in the blocked consumer")
        await asyncio.to_thread(steps.wait_for, lambda: engine._outputs.queued_steps == MAX_QUEUED_STEPS, 30,
                                "the engine thread to fill the output queue")
        stopper = threading.Thread(target=lambda: (engine.shutdown(timeout=30), done.set()))
        stopper.start()
        # The engine thread leaves its wait for room, ends the request and waits for the output thread to drain.
        await asyncio.to_thread(wait_until, lambda: engine.dead_error is not None, 10, "the engine to shut down")
        sink.release()
        await asyncio.wait_for(run, 30)
        await asyncio.to_thread(wait_event, done, 30, "shutdown to return")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert sum(o.finished for o in outs) == 1
    assert not engine._thread.is_alive() and not engine._output.is_alive()
    assert _idle(engine) and engine.engine.output_processor.states == {}
