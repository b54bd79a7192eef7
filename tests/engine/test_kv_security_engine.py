"""The KV plane's findings that need an engine or a scheduler (issue 41, hardening round 4; the raw-socket ones
are in test_kv_security.py):

High 2: a client-named KV source cannot poison the decode engine's prefix cache: sources outside the engine's
        peers are refused when the request is added, and KV nothing authenticated (no deployment secret) serves
        only the request that named it, never a later request through the prefix cache.
High 3: loads waiting on a silent source hold no sequence slot and end at the first-byte deadline; loads past
        their caps (in all, per source) are computed here instead.
Medium 3: no connection anywhere a request names: refused before any connection, so no port-scan oracle.
"""
from __future__ import annotations

import socket
import time

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
from moelink.engine.contract.kv_transfer_params import KVTransferParams

from tests.helpers.kv_params import SECRET, decode_kv, decode_params
from tests.helpers.net import free_port
from tests.helpers.parity import prompts

KW = dict(dtype="float64", num_kv_blocks=96, block_size=4, max_num_batched_tokens=32, max_model_len=128,
          skip_warmup=True)
GREEDY = dict(temperature=0.0, max_tokens=3, ignore_eos=True)


# ------------------------------------------------------------------------------------------- High 2, Medium 3
@pytest.mark.parametrize("peers,host,offset,ranks", [
    (None, "10.0.0.5", 0, 1),  # default: loopback only
    (None, "example.com", 0, 1),
    ("127.0.0.1:{p}", "127.0.0.1", -1, 1),  # the right host, another port
    ("127.0.0.1:{p}", "127.0.0.1", 0, 2),  # remote_ranks reaching past the range
    ("127.0.0.1:{p}", "localhost", 0, 1),  # names compare as given: no lookup
    ("127.0.0.1:{p}", "10.0.0.5", 0, 1),
])
def test_a_source_outside_the_peers_is_refused_when_added_with_no_connection(peers, host, offset, ranks):
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(8)
        lsock.settimeout(0.3)
        p = lsock.getsockname()[1]
        conn = RemoteKVConnector(RemoteKVConfig(peers=None if peers is None else peers.format(p=p)))
        with pytest.raises(ValueError, match=r"^KVTransferParams\.remote_host=.*configured peers \(--kv-peers\)"):
            conn.check_params(decode_params(host=host, port=p + offset, ranks=ranks))
        with pytest.raises(TimeoutError):
            lsock.accept()  # nothing dialled it
        conn.check_params(decode_params(host="127.0.0.1", port=p))  # inside: accepted
    RemoteKVConnector(RemoteKVConfig()).check_params(decode_params(host="::1", port=5))


def test_the_engine_refuses_an_untrusted_source_before_any_connection(tiny_model):
    with LLM(tiny_model("qwen3_e6k3"), kv_connector=RemoteKVConnector(RemoteKVConfig()), **KW) as llm:
        t0 = time.monotonic()
        for host, port in (("10.255.255.1", 22), ("192.168.1.1", 8080)):
            with pytest.raises(ValueError, match=r"KVTransferParams\.remote_host="):
                llm.engine.add_request("a", [1, 2, 3], SamplingParams(kv_transfer_params=decode_kv(host, port)))
        assert time.monotonic() - t0 < 1.0 and not llm.engine.has_requests()


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_loaded_kv_reaches_the_prefix_cache_only_when_authenticated(tiny_model, secret):
    """A load from an unauthenticated source (no deployment secret: any local process could have answered)
    serves its own request, token-identical, but a later ordinary request sharing the prompt gets no prefix hit
    from it; with the secret on both engines, the loaded blocks are shared as computed ones are."""
    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=41, n=2, lo=12, hi=12)  # three full blocks of 4
    with LLM(path, **KW) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(ps, SamplingParams(**GREEDY), use_tqdm=False)]
    pre = RemoteKVConnector(RemoteKVConfig(port=free_port(), secret=secret))
    with LLM(path, kv_connector=pre, **KW) as prefill, \
            LLM(path, kv_connector=RemoteKVConnector(RemoteKVConfig(secret=secret)), **KW) as dec:
        outs = prefill.generate(ps, SamplingParams(max_tokens=1, kv_transfer_params={"do_remote_decode": True}),
                                use_tqdm=False)
        loaded = dec.generate(ps, [SamplingParams(**GREEDY, kv_transfer_params=o.kv_transfer_params) for o in outs],
                              use_tqdm=False)
        assert [o.outputs[0].token_ids for o in loaded] == want
        assert dec.engine.executor.runner.plugin("kv_transfer").connector.stats.num_loaded == len(ps)
        again = dec.generate(ps, SamplingParams(**GREEDY), use_tqdm=False)  # ordinary requests, same prompts
        assert [o.outputs[0].token_ids for o in again] == want
        hits = [o.num_cached_tokens for o in again]
    assert hits == ([0, 0] if secret is None else [8, 8])  # (the last block: its last token is always computed)


# ------------------------------------------------------------------------------------------- High 3
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_loads_from_a_silent_source_hold_no_slot_and_end_at_the_first_byte_deadline(tiny_model):
    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=42, n=9, lo=6, hi=10)
    with socket.socket() as silent:  # accepts (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        src = silent.getsockname()[1]
        config = RemoteKVConfig(first_byte_timeout_s=3.0, fetch_timeout_s=60.0)
        with LLM(path, kv_connector=RemoteKVConnector(config), **{**KW, "max_num_seqs": 4}) as dec:
            engine = dec.engine
            for i, p in enumerate(ps[:8]):  # twice max_num_seqs, all waiting on the silent source
                engine.add_request(f"silent{i}", p, SamplingParams(**GREEDY, kv_transfer_params=decode_kv(port=src)))
            engine.add_request("other", ps[8], SamplingParams(**GREEDY))
            worker = engine.executor.runner.plugin("kv_transfer").connector
            t0, done = time.monotonic(), {}
            while "other" not in done:
                done.update({o.request_id: o for o in engine.step() if o.finished})
            other_s = time.monotonic() - t0
            assert worker.stats.num_failed == 0  # the loads were still waiting: they held no slot from it
            while engine.has_requests():
                done.update({o.request_id: o for o in engine.step() if o.finished})
            total_s = time.monotonic() - t0
    assert other_s < 3.0 and total_s < 3.0 + 10.0  # the first-byte deadline, not the 60 s fetch timeout
    assert worker.stats.num_failed == 8 and all("timed out" in r for _, r in worker.stats.failures)
    assert all(len(done[f"silent{i}"].outputs[0].token_ids) == GREEDY["max_tokens"] for i in range(8))  # recomputed


def test_loads_past_their_caps_are_computed_here():
    """Scheduler level: at most `max_loads` in flight, `max_per_source` from one source, `max_block_fraction` of
    the pool; a request past a cap is computed (not queued behind the loads, not loaded)."""
    from moelink.scheduler import CacheConfig, Scheduler, SchedulerConfig
    from moelink.scheduler.kv_connector import LoadLimits

    from tests.helpers.scheduler_sim import make_request

    class Connector:
        load_limits = LoadLimits(max_loads=3, max_per_source=2, max_block_fraction=0.5, max_per_client=8)

        def num_loadable_tokens(self, req):
            return req.num_prompt_tokens if req.request_id.startswith("load") else 0

        def load_source(self, req):
            return req.request_id.split("-")[1]

        def wants_save(self, req):
            return False

        def transfer_done(self, t, ok):
            pass

    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=64),
                  CacheConfig(block_size=4, num_kv_blocks=64), kv_connector=Connector())
    names = ["load-a-0", "load-a-1", "load-a-2", "load-b-0", "load-c-0", "plain"]
    for name in names:
        s.add_request(make_request(name, [1, 2, 3, 4, 5, 6, 7, 8]))
    so = s.schedule()
    loads = sorted(t.req_id for t in so.kv_transfers.loads)
    assert loads == ["load-a-0", "load-a-1", "load-b-0"]  # two from a, then the global cap of three
    assert set(so.num_scheduled_tokens) == {"load-a-2", "load-c-0", "plain"}  # computed here, not waiting
    assert s.kv_transfers.loads_over_limit == 2
    s.check_invariants()
    s2 = Scheduler(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=256, max_model_len=64),
                   CacheConfig(block_size=4, num_kv_blocks=8), kv_connector=Connector())
    for i in range(3):
        s2.add_request(make_request(f"load-{i}-0", [1, 2, 3, 4, 5, 6, 7, 8]))  # two blocks each, pool of 8
    assert len(s2.schedule().kv_transfers.loads) == 2  # half the pool at most


def test_loads_are_capped_per_client_host_however_many_connections():
    from moelink.scheduler import CacheConfig, Scheduler, SchedulerConfig
    from moelink.scheduler.kv_connector import LoadLimits

    from tests.helpers.scheduler_sim import make_request

    class Connector:
        load_limits = LoadLimits(max_loads=64, max_per_source=64, max_block_fraction=1.0, max_per_client=2)
        trusted_loads = True

        def num_loadable_tokens(self, req):
            return req.num_prompt_tokens

        def load_source(self, req):
            return "prefill"

        def wants_save(self, req):
            return False

        def transfer_done(self, t, ok):
            pass

    s = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256, max_model_len=64),
                  CacheConfig(block_size=4, num_kv_blocks=64), kv_connector=Connector())
    for i in range(4):  # one host, four connections
        s.add_request(make_request(f"a{i}", [1, 2, 3, 4], client=("host:10.0.0.9", f"conn:{i}")))
    s.add_request(make_request("b0", [1, 2, 3, 4], client=("host:10.0.0.8", "conn:1")))
    s.add_request(make_request("anon", [1, 2, 3, 4]))
    so = s.schedule()
    assert sorted(t.req_id for t in so.kv_transfers.loads) == ["a0", "a1", "anon", "b0"]
    assert set(so.num_scheduled_tokens) == {"a2", "a3"}  # computed here
