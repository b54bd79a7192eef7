"""Per-client fairness through the server (engine/server/client_identity.py, scheduler/fairness.py): who a client
is, and a client whose n-sample request holds every sequence slot does not keep another client waiting for it."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from moelink.engine.server.client_identity import (MAX_CLIENT_ID_CHARS, claimed_client, client_of, client_scope,
                                                   http_client, peer_client)

from tests.helpers.grpc_server import make_stubs, pool_is_free
from tests.helpers.waits import wait_until


class _Context:
    def __init__(self, peer, metadata=()):
        self._peer, self._md = peer, metadata

    def peer(self):
        return self._peer

    def invocation_metadata(self):
        return self._md


def test_who_a_client_is():
    assert peer_client("ipv4:10.1.2.3:51234") == ("host:10.1.2.3", "conn:51234")
    assert peer_client("ipv6:[::1]:40000") == ("host:[::1]", "conn:40000")
    assert peer_client("unix:/tmp/s") == ("peer:unix:/tmp/s",) and peer_client(None) == ("peer:",)
    assert claimed_client([("x-client-id", "  alice ")]) == "alice" and claimed_client([("x-client-id", " ")]) is None
    assert claimed_client([("x-client-id", "a" * 1000)]) == "a" * MAX_CLIENT_ID_CHARS
    md = [("authorization", "Bearer k"), ("x-client-id", "alice")]
    # A name is taken only from a caller that proved it holds the API key, and under the host it calls from (issue
    # 95: a name does not escape its host); otherwise the peer it calls from.
    assert client_of(_Context("ipv4:10.1.2.3:5", md), authenticated=True) == ("host:10.1.2.3", "user:alice")
    assert client_of(_Context("unix:/s", md), authenticated=True) == ("peer:unix:/s", "user:alice")
    assert client_of(_Context("ipv4:10.1.2.3:5", md), authenticated=False) == ("host:10.1.2.3", "conn:5")
    assert client_of(_Context("ipv4:10.1.2.3:5"), authenticated=True) == ("host:10.1.2.3", "conn:5")
    assert http_client(("::1", 7, 0, 0), "bob", authenticated=True) == ("host:[::1]", "user:bob")
    assert http_client(("10.0.0.9", 7), "bob", authenticated=False) == ("host:10.0.0.9", "conn:7")
    # The scope of HTTP request ids: the user's name when given, else the host; none for offline use.
    assert client_scope(("host:h", "user:bob")) == "user:bob" and client_scope(("host:h", "conn:7")) == "host:h"
    assert client_scope(()) == ""


def _hog(stubs, results, metadata=None):
    """Client A: one request of n=16 long samples (twice the server's 8 slots)."""
    pb = stubs.pb
    req = pb.GenerateRequest(request_id="hog", prompt_token_ids=pb.TokenIds(ids=[5, 6, 7]),
                             sampling_params=pb.SamplingParams(n=16, max_tokens=400, ignore_eos=True, temperature=0))
    call = stubs.native.Generate(req, timeout=120, metadata=metadata)
    results["call"] = call
    try:
        for msg in call:
            results["started"].set()
            if msg.finish_reason:
                results.setdefault("first_finish", time.monotonic())
    except grpc.RpcError as exc:
        results["error"] = exc.code()


@pytest.mark.parametrize("keyed", [False, True])
def test_a_client_holding_every_slot_does_not_keep_another_waiting(thread_server, keyed):
    srv = thread_server(engine_kw=dict(max_num_seqs=8), **({"api_key": "k"} if keyed else {}))
    auth = [("authorization", "Bearer k")] if keyed else []
    # Two connections (gRPC shares one between channels of a process unless told not to): two clients.
    channels = [grpc.insecure_channel(srv.addr, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(2)]
    try:
        a, b = (make_stubs(ch) for ch in channels)
        hog: dict = {"started": threading.Event()}
        t = threading.Thread(target=_hog, args=(a, hog, auth + ([("x-client-id", "alice")] if keyed else [])))
        t.start()
        sched = srv.engine.engine.schedulers[0]
        assert hog["started"].wait(60), "the hog's first tokens"
        pb = b.pb
        t0 = time.monotonic()
        # With an API key both calls come over channels of one host; the names they give make them two clients.
        msgs = list(b.native.Generate(pb.GenerateRequest(
            request_id="small", prompt_token_ids=pb.TokenIds(ids=[9, 9]),
            sampling_params=pb.SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)),
            timeout=60, metadata=auth + ([("x-client-id", "bob")] if keyed else []) or None))
        done = time.monotonic()
        assert sum(len(m.token_ids) for m in msgs) == 4 and msgs[-1].finish_reason == "length"
        # B ran while every one of A's sequences still had hundreds of tokens to go.
        assert "first_finish" not in hog, f"B waited for A's samples to finish ({done - t0:.2f} s)"
        clients = set(sched.fairness.counts)
        assert ("host:127.0.0.1", "user:alice") in clients if keyed else any(c[0] == "host:127.0.0.1" for c in clients)
        hog["call"].cancel()
        t.join(30)
        wait_until(lambda: pool_is_free(b.native, pb, auth or None), 30, "blocks freed after the cancel")
        assert not sched.fairness.counts  # no client left holding requests
    finally:
        for ch in channels:
            ch.close()
