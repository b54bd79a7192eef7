"""Prefill/decode disaggregation of a hybrid model (Qwen3-Next) with expert parallelism on the decode side: the
prefill engine here on one rank saves each prompt's KV blocks and linear-attention states (at the prompt's n - 1),
the decode engine at EP 2 on Ray loads them on whichever rank each request went to (data-parallel attention: its
state slot is that rank's) and computes only each prompt's last token; greedy outputs equal one engine's and every
rank ends with every KV block and state slot free."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.cluster.kv_remote import RemoteKVConfig, RemoteKVConnector
from moelink.engine.contract.kv_transfer_params import KVTransferParams

from tests.helpers.hf_checkpoints import VOCAB
from tests.helpers.kv_disagg import KW, MAX_NEW
from tests.helpers.net import free_port
from tests.helpers.parity import prompts

pytestmark = pytest.mark.slow


def test_hybrid_prefill_here_decode_at_ep2_on_ray(local_ray, hf_tiny_model):
    path = hf_tiny_model("qwen3_next")
    ps = prompts(VOCAB, seed=31, n=4, lo=6, hi=30)
    plain = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    with LLM(path, **KW) as one:
        want = [o.outputs[0].token_ids for o in one.generate(ps, plain, use_tqdm=False)]
    conn = RemoteKVConnector(RemoteKVConfig(port=free_port()))
    with LLM(path, kv_connector=conn, **KW) as pre:
        saved = pre.generate(ps, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                                                kv_transfer_params=KVTransferParams(do_remote_decode=True)),
                             use_tqdm=False)
        llm = LLM(path, expert_parallel_size=2, kv_connector=RemoteKVConnector(RemoteKVConfig()), **KW)
        try:
            computed = []
            real = llm.engine.executor.launch
            llm.engine.executor.launch = lambda sos: (computed.append(sum(so.total_num_scheduled_tokens
                                                                          for so in sos)), real(sos))[1]
            params = [SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                                     kv_transfer_params=o.kv_transfer_params) for o in saved]
            outs = llm.generate(ps, params, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == want
            assert [o.num_cached_tokens for o in outs] == [len(p) - 1 for p in ps]
            assert sum(computed) == len(ps) * MAX_NEW  # every prompt's first n - 1 tokens and state loaded
            assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
            for sched in llm.engine.schedulers:  # the driver's view of each rank's scheduler
                assert sched.kv.slots.num_free == sched.kv.slots.num_slots
        finally:
            llm.engine.shutdown()
