"""Back-pressure on streams nobody reads (issue 95: 64 prompts x n=16 streamed and never read kept generating,
+84 MB in 60 s, everyone else slower): past `max_undelivered_outputs` untaken outputs a request stops being
scheduled (Scheduler.backlogged, its KV and slot kept) and resumes once its consumer reads the queue down to half;
a consumer that keeps up is never stopped, and nothing leaks."""
from __future__ import annotations

import argparse
import asyncio

import pytest

from moelink.engine import AsyncEngine, EngineArgs
from moelink.engine.api.cli_args import add_engine_args, engine_args_from
from moelink.engine.contract.sampling_params import SamplingParams
from moelink.engine.core.outputs import OutputKind
from moelink.scheduler import ModelRunnerOutput, RequestStatus, SchedulerConfig

from tests.helpers.scheduler_sim import make_request, make_scheduler

LIMIT = 8


def test_a_backlogged_request_keeps_its_slot_and_blocks_and_does_not_block_others():
    s = make_scheduler(num_blocks=256, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    for rid in ("a", "b", "c"):
        s.add_request(make_request(rid, [1, 2, 3], max_tokens=50))

    def step():
        so = s.schedule()
        s.update_from_output(so, ModelRunnerOutput(so.step_id, {rid: [3] for rid in so.num_scheduled_tokens}))
        s.check_invariants()
        return so

    step()
    blocks = list(s.kv.get_block_ids("a"))
    s.backlogged.add("a")
    for _ in range(3):
        so = step()
        assert "a" not in so.num_scheduled_tokens and "b" in so.num_scheduled_tokens
    # Its slot and KV kept: c still waits (two slots), and a's blocks are as they were.
    assert s.get_request("a").status is RequestStatus.RUNNING and s.kv.get_block_ids("a") == blocks
    assert s.get_request("c").status is RequestStatus.WAITING
    # A "wait" pause (admit_new False) drains the started requests: a lagging consumer does not hold it up.
    s.admit_new = False
    assert "a" in step().num_scheduled_tokens
    s.admit_new = True
    # A backlogged request in the waiting queue (preempted) is passed over, not waited behind.
    s.running.remove(req := s.get_request("a"))
    s._preempt(req)
    so = step()
    assert "c" in {r.req_id for r in so.scheduled_new_reqs} and "a" not in so.num_scheduled_tokens
    s.backlogged.discard("a")
    s.finish_requests("c", RequestStatus.FINISHED_ABORTED)
    so = step()
    assert "a" in so.num_scheduled_tokens  # resumed (recomputed: it had been preempted)
    s.backlogged.add("a")
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert not s.backlogged  # forgotten with its request (check_invariants asserts it too)
    s.check_invariants()


def _engine(tiny_model, limit=LIMIT):
    return AsyncEngine.from_engine_args(EngineArgs(model=tiny_model("qwen3_e6k3"), dtype="float32", max_num_seqs=4,
                                                   num_kv_blocks=96, max_model_len=512,
                                                   max_undelivered_outputs=limit))


def test_an_unread_stream_stops_generating_and_resumes_when_read(tiny_model):
    engine = _engine(tiny_model)
    llm = engine.engine
    sched = llm.schedulers[0]
    calls: list[tuple[str, bool]] = []
    real = llm.set_backlogged
    llm.set_backlogged = lambda rid, on: (calls.append((rid, on)), real(rid, on))
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)

    async def main():
        slow = engine.generate("slow", [1, 2, 3], params, output_kind=OutputKind.DELTA)
        tokens = len((await slow.__anext__()).outputs[0].token_ids)
        # A reader that keeps up, beside it: never stopped.
        fast = 0
        async for out in engine.generate("fast", [4, 5, 6], params, output_kind=OutputKind.DELTA):
            fast += len(out.outputs[0].token_ids)
        assert fast == 120
        for _ in range(400):  # the slow one, unread, is stopped past LIMIT outputs
            if "slow" in sched.backlogged:
                break
            await asyncio.sleep(0.01)
        assert "slow" in sched.backlogged
        made = sched.get_request("slow").num_output_tokens
        await asyncio.sleep(0.3)
        req = sched.get_request("slow")
        assert req.num_output_tokens == made and req.status is RequestStatus.RUNNING  # not scheduled, slot kept
        assert made < 120 - 50  # far from done: generation stopped early
        async for out in slow:  # read: it resumes and ends whole
            tokens += len(out.outputs[0].token_ids)
            last = out
        assert tokens == 120 and last.outputs[0].finish_reason == "length"

    try:
        asyncio.run(main())
        assert ("slow", True) in calls and ("slow", False) in calls
        assert all(rid == "slow" for rid, _ in calls)  # the reader that kept up was never stopped
        assert not sched.backlogged and not sched.requests
        s = engine.stats()
        assert s.num_free_blocks == s.num_total_blocks
    finally:
        engine.shutdown()


def test_a_backlogged_stream_walked_away_from_is_freed(tiny_model):
    engine = _engine(tiny_model)
    sched = engine.engine.schedulers[0]
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def main():
        gen = engine.generate("gone", [1, 2, 3], params, output_kind=OutputKind.DELTA)
        await gen.__anext__()
        for _ in range(400):
            if "gone" in sched.backlogged:
                break
            await asyncio.sleep(0.01)
        assert "gone" in sched.backlogged
        await gen.aclose()  # the consumer leaves: aborted, its id forgotten
        for _ in range(400):
            if not sched.requests:
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
        assert not sched.requests and not sched.backlogged
        s = engine.stats()
        assert s.num_free_blocks == s.num_total_blocks
    finally:
        engine.shutdown()


def test_the_limit_is_a_flag_and_a_config_field(tiny_model):
    p = argparse.ArgumentParser()
    add_engine_args(p)
    path = tiny_model("qwen3_e6k3")
    assert engine_args_from(p.parse_args([path])).max_undelivered_outputs == 64
    args = engine_args_from(p.parse_args([path, "--max-undelivered-outputs", "0"]))
    args.num_kv_blocks = 64
    assert args.create_engine_config().scheduler.max_undelivered_outputs == 0  # 0: no limit
    with pytest.raises(ValueError, match="max_undelivered_outputs"):
        EngineArgs(model=path, max_undelivered_outputs=-1)
    with pytest.raises(ValueError, match="SchedulerConfig.max_undelivered_outputs=1.5 is invalid"):
        SchedulerConfig(max_undelivered_outputs=1.5)
