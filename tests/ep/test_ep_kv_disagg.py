"""Prefill/decode disaggregation with expert parallelism on one side (engine/kv_transfer/remote.py): the remote
KV connector travels to Ray ranks as its config (addresses, no sockets), each rank serves or fetches for its
own requests (data-parallel attention keeps a request's KV on the rank that computed it).

- prefill at EP 2 on Ray, in a process this test starts; decode here on one rank: the decode side finds each
  prompt's KV on the prefill rank that saved it (ports port and port + 1), and its greedy outputs equal one
  engine's;
- prefill on one rank in a process this test starts; decode here at EP 2 on Ray: the same outputs, no prompt
  recomputed, every rank's pool free again.
"""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector

from tests.helpers import zygote_ray
from tests.helpers.kv_disagg import KW, MAX_NEW, READY_S, Decoder, PrefillProcess, decode_params, one_engine
from tests.helpers.net import free_port
from tests.helpers.parity import prompts

pytestmark = pytest.mark.slow

PROMPTS = {21: prompts(200, seed=21, n=4, lo=5, hi=19), 22: prompts(200, seed=22, n=4, lo=5, hi=19)}


@pytest.fixture(scope="module")
def want(tiny_model):
    """One engine's greedy outputs of both tests' prompts, in one run: {seed: outputs}."""
    outs = one_engine(tiny_model("qwen3_e6k3"), PROMPTS[21] + PROMPTS[22])
    return {21: outs[:len(PROMPTS[21])], 22: outs[len(PROMPTS[21]):]}


# First the test on this process's Ray (in `make test`, the one the module before left), then the one whose
# prefill process starts a Ray of its own: the shared Ray is not stopped in between, and goes on to the next module.
def test_prefill_on_one_rank_in_another_process_decode_at_ep2(local_ray, tiny_model, want):
    path = tiny_model("qwen3_e6k3")
    ps, want = PROMPTS[22], want[22]
    pre = PrefillProcess({"model": path, "port": free_port(), "prompts": ps, "llm": KW})
    try:
        ready = pre.expect("ready", READY_S)
        llm = LLM(path, expert_parallel_size=2, kv_connector=RemoteKVConnector(RemoteKVConfig()), **KW)
        try:
            computed = []
            real = llm.engine.executor.launch
            llm.engine.executor.launch = lambda sos: (computed.append(sum(so.total_num_scheduled_tokens
                                                                          for so in sos)), real(sos))[1]
            outs = llm.generate(ps, decode_params(ready["params"]), use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == want
            assert sum(computed) == len(ps) * MAX_NEW  # every prompt's KV loaded, on whichever rank it went to
            assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
        finally:
            llm.engine.shutdown()
        closed = pre.close()
        assert closed["store"]["num_served"] == len(ps) and closed["store"]["held"] == 0
    finally:
        pre.close()


def test_prefill_at_ep2_in_another_process_decode_on_one_rank(tiny_model, want):
    path = tiny_model("qwen3_e6k3")
    ps, want = PROMPTS[21], want[21]
    port = free_port(2)  # its two ranks listen on port and port + 1
    # Its Ray's workers (the two ranks) fork from the test zygote, as the test Ray's do (tests/helpers/zygote_ray.py).
    pre = PrefillProcess({"model": path, "port": port, "prompts": ps, "llm": KW, "ep": 2}, env=zygote_ray.node_env({}))
    try:
        ready = pre.expect("ready", READY_S)
        assert ready["first"] == [w[:1] for w in want]
        # Each output names the rank that saved its KV; decode_params names both ranks' ports, asked in turn.
        assert {p["remote_port"] for p in ready["params"]} == {port, port + 1}
        assert all(p["remote_ranks"] == 2 and p["remote_port"] == port for p in ready["scan_params"])
        dec = Decoder(path)
        try:
            dec.add(ps, decode_params(ready["scan_params"]))
            assert dec.run(len(ps)) == want
            stats = dec.worker.stats
            assert stats.num_loaded == len(ps) and stats.num_failed == 0 and dec.computed == len(ps) * MAX_NEW
            # The router spread the prompts over both prefill ranks; each served its own.
            assert set(stats.loaded_from) == {f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"}
            assert dec.free_blocks()[0] == dec.free_blocks()[1]
        finally:
            dec.close()
    finally:
        pre.close()
