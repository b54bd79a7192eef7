"""A request's n samples streamed to a client that stops reading (issue 95: 64 prompts x n=16 never read kept
generating): each sample's untaken outputs are bounded (Serving._many) and past the engine's limit the sample stops
being scheduled (Scheduler.backlogged); when the client reads again every sample resumes and ends whole."""
from __future__ import annotations

import asyncio

from moelink.engine.contract.sampling_params import SamplingParams


def test_samples_nobody_reads_stop_and_resume(thread_server):
    srv = thread_server(engine_kw=dict(max_num_seqs=8, max_undelivered_outputs=4))
    serving, sched = srv.server.serving, srv.engine.engine.schedulers[0]
    n, max_tokens = 4, 80

    async def main():
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
        gen = serving.run("unread", [5, 6, 7], params, n=n, client=("host:10.0.0.1", "conn:1"))
        got = [0] * n
        i, out = await gen.__anext__()
        got[i] += len(out.outputs[0].token_ids)
        for _ in range(500):
            if len(sched.backlogged) == n:
                break
            await asyncio.sleep(0.01)
        assert len(sched.backlogged) == n, sched.backlogged  # every sample stopped
        made = sum(r.num_output_tokens for r in sched.requests.values())
        await asyncio.sleep(0.3)
        assert sum(r.num_output_tokens for r in sched.requests.values()) == made < n * max_tokens // 2
        async for i, out in gen:  # read: they resume and end whole
            got[i] += len(out.outputs[0].token_ids)
        return got

    assert srv.call(main(), timeout=120) == [max_tokens] * n
    assert not sched.backlogged and not sched.requests
