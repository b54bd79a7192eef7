"""Prefill/decode disaggregation of DeepSeek-V4 (issue 45): the compressed entries and CSA's indexer keys travel as
the layers' paged groups, the window ring and the compressors' running rows as their "state" groups
(engine/contract/kv_blocks.PagedKVBlocks: a stateful layer's paged tensors, then its state pools), at the prompt's
n - 1 tokens. Both engines here, over TCP: the decode engine computes only each prompt's last token and its greedy
tokens equal transformers'; both end with every block and state slot free."""
from __future__ import annotations

import pytest

from moelink.engine import SamplingParams
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
from moelink.engine import LLM
from moelink.engine.contract.kv_transfer_params import KVTransferParams
from moelink.engine.contract.kv_blocks import STATE

from tests.helpers.dsv4_checkpoint import VOCAB, save_dsv4_checkpoint
from tests.helpers.kv_disagg import KW, MAX_NEW, Decoder
from tests.helpers.net import free_port
from tests.helpers.parity import hf_greedy, prompts

V4 = {**KW, "block_size": 8}  # a multiple of both compress rates
SAVE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                      kv_transfer_params=KVTransferParams(do_remote_decode=True))


def _all_free(llm) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    sched = llm.engine.schedulers[0]
    assert sched.kv.slots.num_free == sched.kv.slots.num_slots
    sched.check_invariants()


@pytest.mark.slow
def test_compressed_entries_and_states_travel_and_decode_equals_transformers(tmp_path_factory):
    path = save_dsv4_checkpoint(tmp_path_factory.mktemp("dsv4_pd"))
    ps = prompts(VOCAB, seed=29, n=4, lo=1, hi=60)
    want = hf_greedy(path, ps, max_new=MAX_NEW)
    pre = LLM(path, kv_connector=RemoteKVConnector(RemoteKVConfig(port=free_port(), transport="tcp")), **V4)
    dec = None
    try:
        outs = pre.generate(ps, SAVE, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [w[:1] for w in want]
        saved = pre.engine.executor.runner.plugin("kv_transfer").connector.store.peek(outs[1].kv_transfer_params.remote_kv_token)
        kinds = [kind for kind, _ in saved.layout]
        assert kinds.count(STATE) == 4 and kinds.count("full") == 3  # every layer's state; 3 compressed layers' entries
        _all_free(pre)
        dec = Decoder(path, RemoteKVConfig(transport="tcp"), block_size=8)
        dec.add(ps, [SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                                    kv_transfer_params=o.kv_transfer_params) for o in outs])
        got, cached = {}, {}
        while dec.llm.engine.has_requests():
            for o in dec.llm.engine.step():
                if o.finished:
                    got[o.request_id], cached[o.request_id] = o.outputs[0].token_ids, o.num_cached_tokens
        assert [got[f"d{i}"] for i in range(len(ps))] == want
        assert [cached[f"d{i}"] for i in range(len(ps))] == [len(p) - 1 for p in ps]
        assert dec.computed == len(ps) * MAX_NEW
        _all_free(dec.llm)
    finally:
        if dec is not None:
            dec.close()
        pre.engine.shutdown()
