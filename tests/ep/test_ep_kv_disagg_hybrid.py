"""Prefill/decode disaggregation of a hybrid model (Qwen3-Next) with expert parallelism on the decode side: the
prefill engine in a process this test starts (one rank) saves each prompt's KV blocks and linear-attention states
(at the prompt's n - 1), the decode engine here at EP 2 on Ray loads them on whichever rank each request went to
(data-parallel attention: its state slot is that rank's) and computes only each prompt's last token; greedy
outputs equal one engine's, every rank ends with every KV block and state slot free, and the prefill store served
every save once and holds nothing."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector

from tests.helpers.hf_checkpoints import VOCAB
from tests.helpers.kv_disagg import KW, MAX_NEW, READY_S, PrefillProcess, decode_params, one_engine
from tests.helpers.net import free_port
from tests.helpers.parity import prompts

pytestmark = pytest.mark.slow


def test_hybrid_prefill_in_another_process_decode_at_ep2_on_ray(local_ray, hf_tiny_model):
    path = hf_tiny_model("qwen3_next")
    ps = prompts(VOCAB, seed=31, n=4, lo=6, hi=30)
    want = one_engine(path, ps)
    pre = PrefillProcess({"model": path, "port": free_port(), "prompts": ps, "llm": KW})
    try:
        ready = pre.expect("ready", READY_S)
        assert ready["first"] == [w[:1] for w in want]
        llm = LLM(path, expert_parallel_size=2, kv_connector=RemoteKVConnector(RemoteKVConfig()), **KW)
        try:
            computed = []
            real = llm.engine.executor.launch
            llm.engine.executor.launch = lambda sos: (computed.append(sum(so.total_num_scheduled_tokens
                                                                          for so in sos)), real(sos))[1]
            outs = llm.generate(ps, decode_params(ready["params"]), use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == want
            assert [o.num_cached_tokens for o in outs] == [len(p) - 1 for p in ps]
            assert sum(computed) == len(ps) * MAX_NEW  # every prompt's first n - 1 tokens and state loaded
            assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
            for sched in llm.engine.schedulers:  # the driver's view of each rank's scheduler
                assert sched.kv.slots.num_free == sched.kv.slots.num_slots
        finally:
            llm.engine.shutdown()
        closed = pre.close()
        assert closed["store"]["num_served"] == len(ps) and closed["store"]["held"] == 0
    finally:
        pre.close()
