"""Request ids a client reuses or picks never cross-talk inside the engine (the server's Serving layer).

In-process (Serving on a ThreadServer's loop), with the engine thread held
inside a step where a race needs it (tests.helpers.engine_steps), so each case is deterministic.
The engine-level counterpart is tests/engine/test_request_lifecycle.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading

from moelink.engine.api.async_engine import AddCommand
from moelink.engine.contract.sampling_params import SamplingParams

from tests.helpers.engine_steps import EngineSteps
from tests.helpers.waits import wait_event


async def _collect(gen):
    outs = []
    async with contextlib.aclosing(gen):
        async for index, out in gen:
            outs.append((index, out))
    return outs


def test_reused_id_after_cancel_gets_its_own_outputs(thread_server):
    """A client cancels request "a" and at once retries with the same id: the retry must get its own
    tokens and end on its own terms, not the cancelled request's stale outputs and final "abort"."""
    srv = thread_server()
    serving, engine = srv.server.serving, srv.engine
    steps = EngineSteps(engine.engine)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    long_params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def scenario():
        first = serving.run("a", [5, 6, 7], long_params)
        await first.__anext__()  # "a" runs
        steps.hold()
        await asyncio.to_thread(steps.wait_parked, 30)  # the engine thread is inside a step that has "a" in it
        await first.aclose()  # cancelled: the engine is told to abort "a" (processed after this step)
        retry_added = threading.Event()
        send = engine._send

        def send_and_tell(cmd):  # the retry's AddCommand is queued for the engine thread (still parked)
            send(cmd)
            if isinstance(cmd, AddCommand):
                retry_added.set()

        engine._send = send_and_tell
        retry = asyncio.ensure_future(_collect(serving.run("a", [5, 6, 7], params)))
        await asyncio.to_thread(wait_event, retry_added, 30, "the retry's AddCommand")
        steps.release()
        return await asyncio.wait_for(retry, 30)

    outs = srv.call(scenario(), timeout=60)
    tokens = [t for _, o in outs for t in o.outputs[0].token_ids]
    assert outs[-1][1].outputs[0].finish_reason == "length", [(o.request_id, o.outputs[0].finish_reason) for _, o in outs]
    assert len(tokens) == 6
    # And nothing is left running in the engine (no orphan that nobody reads).
    assert steps.wait_for(lambda: not engine.engine.has_unfinished_requests(), 10, "no request left in the engine")


def test_sample_ids_do_not_collide_with_client_ids(thread_server):
    """Client ids "b" (n=2) and "b#0" (n=1) are different requests: both must run."""
    srv = thread_server()
    serving = srv.server.serving
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    long_params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    async def scenario():
        many_gen = serving.run("b", [5, 6], long_params, n=2)
        first = await many_gen.__anext__()  # "b" runs (both samples are in the engine)
        many = asyncio.ensure_future(_collect(many_gen))
        one = asyncio.ensure_future(_collect(serving.run("b#0", [8, 9], params)))
        return await asyncio.wait_for(asyncio.gather(many, one), 30)

    many, one = srv.call(scenario(), timeout=60)
    assert all(o.outputs[0].finish_reason == "length" for _, o in many if o.finished)
    assert sorted({i for i, o in many if o.finished}) == [0, 1]
    assert one[-1][1].outputs[0].finish_reason == "length"


def test_abort_right_after_admission_aborts_every_sample(thread_server):
    """Abort that arrives after a request with n=2 is admitted but before its samples reached the engine
    must still end every sample with "abort" (not let them run to max_tokens)."""
    srv = thread_server()
    serving = srv.server.serving
    params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)

    async def scenario():
        task = asyncio.ensure_future(_collect(serving.run("c", [5, 6], params, n=2)))
        await asyncio.sleep(0)  # the request is admitted; its per-sample tasks have not run yet
        assert serving.registry.running("c")
        assert await serving.abort(["c"]) == 1
        return await asyncio.wait_for(task, 60)

    outs = srv.call(scenario(), timeout=90)
    finals = {i: o.outputs[0].finish_reason for i, o in outs if o.finished}
    assert finals == {0: "abort", 1: "abort"}
