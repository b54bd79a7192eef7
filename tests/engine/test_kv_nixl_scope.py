"""What a fetcher can reach over NIXL with what its own fetch gave it (issue 53, findings 2 and 3).

The attack of hardening round 5: a client fetches its own saved request with its own capability; the reply carried
NIXL metadata covering the prefill rank's whole registered cache, with which it READ every user's KV (and a later
user's, with no new fetch) and WROTE a shared system prompt's blocks. Here, on a real prefill engine:

- loopback without the deployment secret (the attack's set-up: any local process completes the handshake): the
  reply carries no NIXL metadata at all (the bytes come on the socket), the serving agent registers nothing, and a
  decode engine still loads the KV (greedy tokens equal one engine's);
- with the secret (an authenticated peer that misbehaves): the metadata covers a copy of exactly its request's rows,
  for its one fetch; a READ of the cache (another user's blocks) is refused, during the fetch and with the stale
  metadata after a later request; a WRITE into what it was given changes no byte of the cache, and the next user
  sharing the system prompt gets one engine's tokens.
"""
from __future__ import annotations

import base64
import os

import pytest
import torch

from moelink.benchmarks.kv_attack import cache_tensors, own_fetch, raw_transfer
from moelink.engine import LLM, SamplingParams
from moelink.engine.contract.kv_transfer_params import KVTransferParams
from moelink.engine.kv_transfer.nixl import NixlAgent, nixl_available
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
from moelink.engine.kv_transfer.wire import Deadline, send_header

from tests.helpers.kv_disagg import KW, MAX_NEW, Decoder, one_engine
from tests.helpers.kv_params import SECRET
from tests.helpers.net import free_port, listening

pytestmark = pytest.mark.skipif(not nixl_available(), reason="the nixl package is not installed")

SAVE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                      kv_transfer_params=KVTransferParams(do_remote_decode=True))
SYSTEM = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]  # three blocks of 4, shared through the prefix cache
VICTIM = SYSTEM + [41, 42, 43, 44, 45]
ATTACKER = SYSTEM + [71, 72, 73]
LATER = SYSTEM + [91, 92, 93, 94, 95, 96]


def _prefill(path, secret):
    conn = RemoteKVConnector(RemoteKVConfig(port=free_port(), transport="nixl", secret=secret))
    return LLM(path, kv_connector=conn, **KW)


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_without_the_secret_a_fetch_gets_its_bytes_on_the_socket_and_no_key_to_any_memory(tiny_model, monkeypatch):
    path = tiny_model("qwen3_e6k3")
    exposed = []
    real = NixlAgent.expose
    monkeypatch.setattr(NixlAgent, "expose", lambda self, ts: exposed.append(ts) or real(self, ts))
    with _prefill(path, None) as pre:
        pre.generate([VICTIM], SAVE, use_tqdm=False)
        (mine,) = pre.generate([ATTACKER], SAVE, use_tqdm=False)
        sock, reply = own_fetch(pre, mine, ATTACKER, None)
        sock.close()
        assert "nixl" not in reply  # no agent name, no metadata, no address: nothing to READ or WRITE with
        serving = pre.engine.executor.runner.plugin("kv_transfer").connector.transport.agent(serving=True)
        assert exposed == [] and serving.regions.num_registered == 0
        # A decode engine (no secret either) still loads the victim's KV, over the socket.
        (victim,) = pre.generate([VICTIM[:-1] + [46]], SAVE, use_tqdm=False)
        dec = Decoder(path, RemoteKVConfig(transport="nixl"))
        try:
            dec.add([VICTIM[:-1] + [46]], [SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                                                          kv_transfer_params=victim.kv_transfer_params)])
            assert dec.run(1) == one_engine(path, [VICTIM[:-1] + [46]])
            assert dec.worker.stats.num_loaded == 1 and dec.computed == MAX_NEW
        finally:
            dec.close()
        assert exposed == []


def test_with_the_secret_a_fetch_reaches_only_a_copy_of_its_own_rows_for_its_one_fetch(tiny_model):
    path = tiny_model("qwen3_e6k3")
    want_later = one_engine(path, [LATER])
    attacker = NixlAgent(progress_thread=False)
    try:
        with _prefill(path, SECRET) as pre:
            pre.generate([VICTIM], SAVE, use_tqdm=False)
            (mine,) = pre.generate([ATTACKER], SAVE, use_tqdm=False)
            cache = cache_tensors(pre)
            before = [x.clone() for x in cache]
            sock, reply = own_fetch(pre, mine, ATTACKER, SECRET)
            nixl = reply["nixl"]
            remote = nixl["agent"]
            attacker.load_remote(remote, base64.b64decode(nixl["meta"]))
            buf = torch.zeros(1 << 20, dtype=torch.uint8)
            attacker.register([(buf.data_ptr(), buf.numel(), 0, "")], "DRAM")
            # Its own rows: readable (what it was given).
            ti, ((base, _, row), *_) = nixl["tensors"][0]
            assert raw_transfer(attacker, remote, "READ", buf, base, row) == "DONE"
            # The cache: another user's blocks, the shared system prompt's, any byte of it: no key covers them.
            for x in cache:
                n = min(x.numel() * x.element_size(), buf.numel())
                assert raw_transfer(attacker, remote, "READ", buf, x.data_ptr(), n) == "refused"
                assert raw_transfer(attacker, remote, "WRITE", buf, x.data_ptr(), n) == "refused"
            # A WRITE into what it was given lands in that copy: no byte of the cache changes.
            buf.fill_(0x5A)
            raw_transfer(attacker, remote, "WRITE", buf, base, row)
            send_header(sock, {"read": True}, Deadline(5.0, "attack"))
            sock.recv(1)
            sock.close()
            assert all(torch.equal(a, b) for a, b in zip(cache, before))
            # A later user sharing the system prompt gets one engine's tokens; with the stale metadata and no new
            # fetch, its blocks are out of reach too.
            later = pre.generate([LATER], SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True),
                                 use_tqdm=False)
            assert [o.outputs[0].token_ids for o in later] == want_later
            for x in cache:
                n = min(x.numel() * x.element_size(), buf.numel())
                assert raw_transfer(attacker, remote, "READ", buf, x.data_ptr(), n) == "refused"
            serving = pre.engine.executor.runner.plugin("kv_transfer").connector.transport.agent(serving=True)
            assert serving.regions.num_registered == 0
    finally:
        attacker.close()


def test_ucx_listens_only_on_the_interfaces_the_server_was_told_to_use():
    """Issue 53 finding 4: UCX's TCP transport listened on every interface for prefill and decode alike. A
    transport's agents, made for a loopback KV host and loopback peers, listen on loopback only; a wildcard host
    leaves UCX as it is; an operator's own UCX_NET_DEVICES wins."""
    from moelink.engine.kv_transfer.transport import make_transport
    from moelink.engine.kv_transfer.ucx_net import devices_for, interface_of

    lo = interface_of("127.0.0.1")
    assert lo is not None and devices_for("127.0.0.1", None) == devices_for(None, ()) == lo
    assert devices_for("0.0.0.0", None) is None and devices_for(None, ("::",)) is None
    before = listening(pids=[os.getpid()])
    t = make_transport("nixl", 5.0, 5.0)
    try:
        t.bind_hosts("127.0.0.1", ())
        assert t.agent(serving=True).net_devices == t.agent(serving=False).net_devices == lo
        new = listening(pids=[os.getpid()]) - before
        assert new and all(a.startswith("127.") or a == "::1" for a, _ in new), new
    finally:
        t.close()
