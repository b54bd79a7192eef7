"""The KV plane as an attacker on loopback sees it (issue 41, hardening round 4): raw sockets against real KV
servers (engine/kv_transfer/server.py and the transports), one regression test per finding and its variations.

High 1: no prompt echoed, no key-existence oracle, exact tokens, nothing consumed by a failed fetch, capabilities
        not derived from request ids, peers authenticated by the deployment secret.
High 2 and Medium 3: a decode engine fetches only from its configured peers (refused when the request is added),
        and never shares KV nothing authenticated (tests/engine/test_kv_security_engine.py).
High 3: loads hold no sequence slot, are capped, and a silent source costs the first-byte deadline.
High 4 and Medium 2: header and token sizes refused by their declared length, before allocation.
High 5: the collective transport's rendezvous binds the fetch's own address only, and closes after a refusal.
Medium 1: idle and trickling connections cannot hold the server's slots.
Low 1-4: TTL sweep while idle; shm socket paths from validated hosts only; no old bytes in shm replies; a
        non-string key refused as such.
Issue 53 (round 5) low 1: a hello's bad nonce or non-integer version is refused naming the field, not the version.
"""
from __future__ import annotations

import os
import socket
import stat
import struct
import threading
import time

import pytest
import torch

from moelink.engine.kv_transfer.auth import SecretAuth, load_secret, new_capability
from moelink.engine.kv_transfer.server import KVSocketServer, ServerLimits
from moelink.engine.kv_transfer.store import SavedKVStore
from moelink.engine.kv_transfer.tcp import TCPKVServer, bound_socket, tcp_fetch
from moelink.engine.kv_transfer.wire import (MAGIC, VERSION, Deadline, KVFetchError, layout_to_json, recv_header, send_header,
                                            tokens_to_bytes)
from moelink.engine.contract.kv_blocks import SavedKV

from tests.helpers.kv_params import NO_KV, SECRET
from tests.helpers.net import free_port, listening

LAYOUT = (("full", (("torch.float32", (4, 2, 8)), ("torch.float32", (4, 2, 8)))),)
PROMPT = (101, 202, 303, 404, 505, 606, 707, 808)  # distinctive ids: their int32 bytes must never come back
FAST = ServerLimits(handshake_timeout_s=0.5, io_timeout_s=5.0, max_prompt_tokens=4096, sweep_s=0.05)


def _saved(tokens=PROMPT, num_blocks=2) -> SavedKV:
    rows = tuple(torch.full((num_blocks, 4, 2, 32), 7, dtype=torch.uint8) for _ in range(2))
    return SavedKV(len(tokens), tuple(tokens), LAYOUT, [(list(range(num_blocks)), rows)])


@pytest.fixture
def server():
    """(store, port) of a TCP KV server on loopback with short deadlines, no secret."""
    store = SavedKVStore(60.0, 1 << 24)
    port = free_port()
    srv = TCPKVServer(store, "127.0.0.1", port, limits=FAST)
    try:
        yield store, port, srv
    finally:
        srv.close()


def _connect(port: int, secret: bytes | None = None) -> socket.socket:
    """A raw connection that has done the handshake (without a secret, anyone on loopback can)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    SecretAuth(secret).client(sock, Deadline(5.0, "test"), "test")
    return sock


def _ask(port: int, key, tokens=PROMPT, layout=LAYOUT, num_tokens=None, extra=None) -> tuple[dict, bytes]:
    """One raw request; (the reply header, every byte after it until the server closes)."""
    with _connect(port) as sock:
        n = len(tokens) if num_tokens is None else num_tokens
        send_header(sock, {"v": VERSION, "key": key, "layout": layout_to_json(layout), "num_tokens": n, **(extra or {})})
        sock.sendall(tokens_to_bytes(tokens))
        reply = recv_header(sock, Deadline(5.0, "reply"))
        rest = b""
        while chunk := sock.recv(1 << 16):
            rest += chunk
        return reply, rest


# ------------------------------------------------------------------------------------------- High 1
def test_refusals_are_identical_whether_a_key_exists_and_consume_nothing(server):
    store, port, _ = server
    cap = new_capability()
    store.put(cap, _saved())
    probes = [
        ("no such key", new_capability(), PROMPT, None),
        ("the key, no tokens", cap, (), 0),  # the finding: num_tokens 0 skipped the token check
        ("the key, a prefix of the prompt", cap, PROMPT[:4], None),
        ("the key, one token changed", cap, PROMPT[:-1] + (1,), None),
        ("the key, the prompt and more", cap, PROMPT + (9,), None),
        ("the key, a count that lies", cap, PROMPT, 4),
    ]
    answers = {}
    for what, key, tokens, n in probes:
        try:
            reply, rest = _ask(port, key, tokens, num_tokens=n)
        except (KVFetchError, OSError):
            reply, rest = {"closed": True}, b""
        answers[what] = reply
        assert reply.get("ok") is not True, what
        assert tokens_to_bytes(PROMPT[:2]) not in rest and "token_ids" not in reply, what
    wrong_key, *with_key = [answers[w] for w, *_ in probes if w != "the key, no tokens" and w != "the key, a count that lies"]
    assert all(a == wrong_key for a in with_key) and wrong_key == {"ok": False, "error": NO_KV}
    assert len(store) == 1 and store.counters.num_served == 0  # nothing consumed by any of them
    got = tcp_fetch("127.0.0.1", port, cap, LAYOUT, list(PROMPT), 2, 2.0, 5.0)  # the real decode engine still can
    assert got.num_tokens == len(PROMPT) and len(store) == 0


def test_the_ok_reply_carries_no_prompt(server):
    store, port, _ = server
    cap = new_capability()
    store.put(cap, _saved())
    reply, rest = _ask(port, cap)
    assert reply["ok"] is True and "token_ids" not in reply
    assert tokens_to_bytes(PROMPT[:3]) not in rest  # the KV bytes only (all 7s here)


def test_capabilities_are_random_per_save_not_derived_from_request_ids():
    from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
    from moelink.scheduler.request import Request

    side = RemoteKVConnector(RemoteKVConfig(port=free_port())).scheduler_side(0)
    req = Request("client-chosen-id|0", [1, 2, 3], None)
    caps = {side.save_params(req) for _ in range(100)}
    assert len(caps) == 100 and all(len(c) == 22 and "client" not in c for c in caps)


def test_a_salted_requests_save_and_fetch_keys_are_bound_to_its_salt():
    """A request whose KV depends on more than its tokens (images, an adapter: Request.cache_salt) is saved and
    fetched under its capability bound to that salt (auth.salted_key): a fetch with other images behind the same
    tokens asks for a key nothing is saved under. The key keeps a token's shape (its TP suffix read as before)."""
    from moelink.engine import SamplingParams
    from moelink.engine.contract.kv_transfer_params import KVTransferParams, is_kv_token
    from moelink.engine.kv_transfer.auth import salted_key
    from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
    from moelink.engine.kv_transfer.tp_shard import save_token, token_tp_size
    from moelink.scheduler.request import Request

    cap = new_capability()
    assert salted_key(cap, b"") == cap  # a plain prompt: the capability itself
    a, b = salted_key(cap, b"mm:" + b"a" * 32), salted_key(cap, b"mm:" + b"b" * 32)
    assert len({cap, a, b}) == 3 and all(is_kv_token(k) and len(k) == 22 for k in (a, b))
    tp = salted_key(save_token(cap, 2), b"mm:a")
    assert token_tp_size(tp) == 2 and tp.endswith("-tp2") and tp != save_token(cap, 2)
    side = RemoteKVConnector(RemoteKVConfig(port=free_port())).scheduler_side(0)
    save = SamplingParams(kv_transfer_params=KVTransferParams(do_remote_decode=True))
    req = Request("r", [1, 2, 3], save, cache_salt=b"mm:a")
    key = side.save_params(req)
    req.num_computed_tokens = 3
    out = side.request_finished(req)  # the output names the bare capability, the store the bound key
    assert out.remote_kv_token != key and salted_key(out.remote_kv_token, b"mm:a") == key
    load = SamplingParams(kv_transfer_params=out)
    for salt, same in ((b"mm:a", True), (b"mm:b", False), (b"", False)):
        assert (side.load_params(Request("d", [1, 2, 3], load, cache_salt=salt)).key == key) is same


def test_with_a_secret_only_peers_that_prove_it_get_anything(server):
    store = SavedKVStore(60.0, 1 << 24)
    port = free_port()
    srv = TCPKVServer(store, "127.0.0.1", port, limits=FAST, auth=SecretAuth(SECRET))
    cap = new_capability()
    store.put(cap, _saved())
    try:
        # No secret, and a wrong one: refused at the handshake, before any request is read.
        with pytest.raises(KVFetchError, match="requires the deployment's KV secret"):
            tcp_fetch("127.0.0.1", port, cap, LAYOUT, list(PROMPT), 2, 2.0, 5.0)
        with pytest.raises(KVFetchError, match="did not prove the deployment's KV secret"):
            tcp_fetch("127.0.0.1", port, cap, LAYOUT, list(PROMPT), 2, 2.0, 5.0, auth=SecretAuth(b"x" * 32))
        assert len(store) == 1
        got = tcp_fetch("127.0.0.1", port, cap, LAYOUT, list(PROMPT), 2, 2.0, 5.0, auth=SecretAuth(SECRET))
        assert got.num_tokens == len(PROMPT)
    finally:
        srv.close()


def test_a_decode_engine_sends_nothing_to_a_peer_that_does_not_prove_the_secret():
    """A source that accepts but does not hold the secret gets neither the capability nor the prompt."""
    cap = new_capability()
    seen = bytearray()
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)

        def impostor():
            conn, _ = lsock.accept()
            with conn:
                conn.settimeout(3)
                seen.extend(conn.recv(1 << 16))
                send_header(conn, {"ok": True, "v": VERSION, "nonce": "00" * 32, "proof": "ab" * 32})
                try:
                    while chunk := conn.recv(1 << 16):
                        seen.extend(chunk)
                except OSError:
                    pass

        t = threading.Thread(target=impostor)
        t.start()
        with pytest.raises(KVFetchError, match="did not prove"):
            tcp_fetch("127.0.0.1", lsock.getsockname()[1], cap, LAYOUT, list(PROMPT), 2, 2.0, 5.0,
                      auth=SecretAuth(SECRET))
        t.join(10)
    assert cap.encode() not in seen and tokens_to_bytes(PROMPT[:2]) not in seen


def test_the_secret_is_required_off_loopback_and_read_only_from_a_private_file(tmp_path):
    from moelink.engine.kv_transfer.remote import RemoteKVConfig

    with pytest.raises(ValueError, match=r"RemoteKVConfig\.secret=None is invalid with host='10\.0\.0\.5'.*--kv-secret-file"):
        RemoteKVConfig(port=5600, host="10.0.0.5")
    with pytest.raises(ValueError, match=r"secret=None is invalid with host='0\.0\.0\.0'"):
        RemoteKVConfig(port=5600, host="0.0.0.0", advertise_host="10.0.0.5")
    with pytest.raises(ValueError, match=r"secret=None is invalid with peers='10\.0\.0\.5:5600'"):
        RemoteKVConfig(peers="10.0.0.5:5600")
    assert RemoteKVConfig(port=5600, host="10.0.0.5", secret=SECRET).secret == SECRET
    assert "test-kv-secret" not in repr(RemoteKVConfig(secret=SECRET))  # never shown
    f = tmp_path / "kv.secret"
    f.write_bytes(SECRET + b"\n")
    f.chmod(0o644)
    with pytest.raises(ValueError, match=r"--kv-secret-file=.* mode 0644 lets other users"):
        load_secret(str(f), env={})
    f.chmod(0o600)
    assert load_secret(str(f), env={}) == SECRET
    f.write_bytes(b"short")
    with pytest.raises(ValueError, match="at least 16"):
        load_secret(str(f), env={})
    assert load_secret(None, env={"MOELINK_KV_SECRET": SECRET.decode()}) == SECRET
    assert load_secret(None, env={}) is None
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600


@pytest.mark.parametrize("old", [1, 2])
def test_a_peer_of_another_protocol_version_is_told_so(server, old):
    """Version 1 (before the handshake) and 2 (untyped layouts: it would take a hybrid model's state groups for
    blocks) are refused, naming both versions."""
    store, port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        send_header(sock, {"v": old, "key": "k", "layout": [], "num_tokens": 1, "token_ids": [1]})
        reply = recv_header(sock, Deadline(5.0, "reply"))
    assert VERSION == 3
    assert reply["ok"] is False and f"protocol version {old}: this server speaks version 3" in reply["error"]


def _hello(port: int, hello: dict) -> str:
    """The server's refusal of one raw hello."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        send_header(sock, hello)
        reply = recv_header(sock, Deadline(5.0, "reply"))
    assert reply["ok"] is False
    return reply["error"]


@pytest.mark.parametrize("nonce, what", [("ab" * 5, "has 10 characters"), (None, "is missing"),
                                         (7, "is a JSON number, not a string"), ("zz" * 32, "is not hexadecimal"),
                                         ("ab " * 21 + " ", "is not hexadecimal")])
def test_a_hello_of_this_version_with_a_bad_nonce_is_told_what_is_wrong_with_it(server, nonce, what):
    """Issue 53 low 1: a short nonce was answered "this server speaks version 3", which the peer does."""
    _, port, _ = server
    error = _hello(port, {"v": VERSION, "hello": nonce, "auth": "none"})
    assert f"the hello's client nonce 'hello' {what}: " in error and "exactly 64 hex digits" in error
    assert "speaks version" not in error


@pytest.mark.parametrize("v", [3.0, 2.0, "3", True])
def test_a_version_that_is_not_an_integer_is_refused_as_such(server, v):
    """Issue 53 low 1: 3.0 was answered "protocol version below 2"."""
    _, port, _ = server
    error = _hello(port, {"v": v, "hello": "ab" * 32, "auth": "none"})
    assert "the hello's protocol version 'v' is a JSON " in error and "not an integer" in error
    assert "below 2" not in error


def test_a_hello_with_no_version_is_a_peer_before_version_2(server):
    _, port, _ = server
    assert "protocol version below 2 (its hello has no 'v')" in _hello(port, {"hello": "ab" * 32})


def test_a_server_of_the_old_protocol_version_is_refused_by_the_fetch():
    """A version-2 prefill server's handshake reply: the fetch fails at once, naming the version it needs."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)

        def old_server():
            conn, _ = lsock.accept()
            with conn:
                conn.settimeout(3)
                conn.recv(1 << 16)
                send_header(conn, {"ok": True, "v": 2, "nonce": "00" * 32})

        t = threading.Thread(target=old_server)
        t.start()
        with pytest.raises(KVFetchError, match="is not a KV server of protocol version 3"):
            tcp_fetch("127.0.0.1", lsock.getsockname()[1], "k", LAYOUT, [1], 1, 2.0, 2.0)
        t.join(10)


# ------------------------------------------------------------------------------------------- High 3
def test_a_silent_source_costs_the_first_byte_deadline_not_the_fetch_timeout():
    with socket.socket() as lsock:  # accepts, never answers
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(4)
        t0 = time.monotonic()
        with pytest.raises(KVFetchError, match="handshake: timed out"):
            tcp_fetch("127.0.0.1", lsock.getsockname()[1], new_capability(), LAYOUT, list(PROMPT), 2, 2.0, 60.0,
                      first_byte_s=0.3)
        assert time.monotonic() - t0 < 2.0


# ------------------------------------------------------------------------------------------- High 4, Medium 2
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.parametrize("after_handshake", [False, True])
def test_huge_declared_headers_are_refused_unread_and_cost_no_memory(server, after_handshake):
    store, port, _ = server
    cap = new_capability()
    store.put(cap, _saved())
    before = _rss_mb()
    socks = []
    t0 = time.monotonic()
    for _ in range(16):  # 16 x 60 MB declared, 1 KiB sent
        s = _connect(port) if after_handshake else socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(MAGIC + struct.pack(">I", 60 << 20) + b"{" * 1024)
        socks.append(s)
    for s in socks:
        reply = recv_header(s, Deadline(5.0, "reply"))
        assert reply["ok"] is False and "at most" in reply["error"]
        s.close()
    assert time.monotonic() - t0 < 3.0
    assert _rss_mb() - before < 30  # (60 MB each, were they allocated)
    got = tcp_fetch("127.0.0.1", port, cap, LAYOUT, list(PROMPT), 2, 2.0, 5.0)  # others are served meanwhile
    assert got.num_tokens == len(PROMPT)


def test_token_counts_past_the_servers_cap_are_refused_by_name(server):
    _, port, _ = server
    reply, _ = _ask(port, new_capability(), tokens=(), num_tokens=FAST.max_prompt_tokens + 1)
    assert reply == {"ok": False, "error": f"a KV request whose num_tokens is not an integer in [1, "
                                           f"{FAST.max_prompt_tokens}]"}


# ------------------------------------------------------------------------------------------- Medium 1
def test_idle_connections_from_one_address_cannot_take_every_slot():
    store = SavedKVStore(60.0, 1 << 24)
    port = free_port()
    limits = ServerLimits(handshake_timeout_s=30.0, io_timeout_s=5.0, max_connections=8, max_per_peer=6)
    srv = TCPKVServer(store, "127.0.0.1", port, limits=limits)
    idle = []
    try:
        for _ in range(40):  # far past both caps, all from 127.0.0.1, silent (a deadline far away)
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.3)
        for i in range(5):
            cap = new_capability()
            store.put(cap, _saved())
            got = tcp_fetch("127.0.0.1", port, cap, LAYOUT, list(PROMPT), 2, 2.0, 5.0)  # the oldest idle ones go
            assert got.num_tokens == len(PROMPT), i
        assert srv.num_evicted >= 40 - limits.max_per_peer
    finally:
        for s in idle:
            s.close()
        srv.close()


def test_a_trickling_peer_is_cut_off_at_the_whole_message_deadline(server):
    _, port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        t0 = time.monotonic()
        closed = None
        hello = MAGIC + struct.pack(">I", 200) + b"{" + b" " * 199
        for b in hello:  # one byte every 0.1 s: each read is quick, the message never ends
            try:
                sock.sendall(bytes([b]))
            except OSError:
                closed = time.monotonic() - t0
                break
            time.sleep(0.1)
            sock.setblocking(False)
            try:
                if sock.recv(1 << 16) == b"":
                    closed = time.monotonic() - t0
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = time.monotonic() - t0
                break
            finally:
                sock.setblocking(True)
        assert closed is not None and closed < FAST.handshake_timeout_s + 1.5


# ------------------------------------------------------------------------------------------- High 5
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_the_collective_rendezvous_binds_the_fetch_address_only_and_closes_after_refusals():
    from moelink.engine.kv_transfer import collective as kv_collective
    from moelink.engine.kv_transfer.collective import CollectiveKVServer, collective_fetch

    port = free_port()
    store = SavedKVStore(60.0, 1 << 24)
    srv = CollectiveKVServer(store, "127.0.0.1", port, limits=FAST)
    me = [os.getpid()]
    try:
        before = listening(pids=me)
        for _ in range(20):  # the finding: 20 refused fetches left 20 listeners on every interface
            with pytest.raises(KVFetchError, match=NO_KV):
                collective_fetch("127.0.0.1", port, new_capability(), LAYOUT, list(PROMPT), 2, 2.0, 5.0)
        assert listening(pids=me) == before and kv_collective._client_pairs.get(("127.0.0.1", port)) is None
        cap = new_capability()
        store.put(cap, _saved())
        got = collective_fetch("127.0.0.1", port, cap, LAYOUT, list(PROMPT), 2, 2.0, 10.0)
        assert got.num_tokens == len(PROMPT)
        opened = listening(pids=me) - before  # the rendezvous, and gloo's own (both ends here)
        assert ("127.0.0.1", kv_collective._client_pairs.get(("127.0.0.1", port)).port) in opened
        assert opened and not {host for host, _ in opened} & {"0.0.0.0", "::"}  # never every interface
    finally:
        srv.close()
        kv_collective._client_pairs.drop(("127.0.0.1", port))


def test_a_collective_server_joins_only_a_rendezvous_on_its_clients_address(server):
    from moelink.engine.kv_transfer.collective import CollectiveKVServer

    store = SavedKVStore(60.0, 1 << 24)
    port = free_port()
    srv = CollectiveKVServer(store, "127.0.0.1", port, limits=FAST)
    cap = new_capability()
    store.put(cap, _saved())
    try:
        reply, _ = _ask(port, cap, extra={"pg": {"host": "10.9.9.9", "port": 29500, "pair": "ab" * 16}})
        assert reply["ok"] is False and "rendezvous" in reply["error"]
    finally:
        srv.close()


# ------------------------------------------------------------------------------------------- Low 1-4
def test_saved_kv_past_its_ttl_is_freed_while_the_engine_is_idle():
    store = SavedKVStore(0.2, 1 << 24)
    srv = TCPKVServer(store, "127.0.0.1", free_port(), limits=FAST)
    try:
        for _ in range(5):
            store.put(new_capability(), _saved())
        assert len(store) == 5
        deadline = time.monotonic() + 5
        while len(store) and time.monotonic() < deadline:  # no store op, no engine step: the sweeper alone
            time.sleep(0.05)
        assert len(store) == 0 and store.nbytes == 0 and store.counters.num_expired == 5
    finally:
        srv.close()


@pytest.mark.parametrize("host", ["../../tmp/x", "a/b", "..", "127.0.0.1/../../x", "a b"])
def test_shm_socket_paths_come_from_validated_hosts_only(host):
    from moelink.engine.kv_transfer.shm import shm_fetch, unix_socket_path
    from moelink.engine.contract.kv_transfer_params import KVTransferParams

    from tests.helpers.kv_params import decode_kv

    with pytest.raises(ValueError, match="remote_host"):
        unix_socket_path(host, 5600)
    with pytest.raises(KVFetchError, match="remote_host"):
        shm_fetch(host, 5600, new_capability(), LAYOUT, list(PROMPT), 2, 1.0)
    with pytest.raises(ValueError, match=r"KVTransferParams\.remote_host="):
        KVTransferParams(**decode_kv(host=host))


def test_shm_replies_never_carry_an_earlier_replys_bytes(monkeypatch):
    from moelink.engine.kv_transfer import shm as kv_shm
    from moelink.engine.kv_transfer.shm import ShmKVServer, shm_fetch

    port = free_port()
    store = SavedKVStore(60.0, 1 << 26)
    srv = ShmKVServer(store, "127.0.0.1", port, limits=FAST)
    sizes = []
    real = socket.recv_fds

    def spy(sock, bufsize, maxfds, flags=0):
        msg, fds, fl, addr = real(sock, bufsize, maxfds, flags)
        for fd in fds:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, 1 << 20, size)  # whatever is past the reply's end
            sizes.append((size, tail))
        return msg, fds, fl, addr

    monkeypatch.setattr(kv_shm.socket, "recv_fds", spy)
    try:
        big, small = new_capability(), new_capability()
        store.put(big, _saved(num_blocks=40))
        store.put(small, _saved(num_blocks=1))
        shm_fetch("127.0.0.1", port, big, LAYOUT, list(PROMPT), 40, 5.0)
        time.sleep(0.2)  # the server takes the file back once the client hung up
        shm_fetch("127.0.0.1", port, small, LAYOUT, list(PROMPT), 1, 5.0)
    finally:
        srv.close()
    (big_size, _), (small_size, tail) = sizes
    assert big_size == 40 * 2 * 256 and small_size == 2 * 256 and tail == b""


def test_a_non_string_key_is_refused_as_such(server):
    _, port, _ = server
    for key in (5, None, ["k"], "", "k" * 300):
        reply, _ = _ask(port, key)
        assert reply["ok"] is False and "key is not a string" in reply["error"] and "version" not in reply["error"]


def test_the_kv_server_binds_exactly_its_host():
    port = free_port()
    srv = KVSocketServer(SavedKVStore(60.0, 1 << 20), bound_socket("127.0.0.1", port), limits=FAST)
    try:
        assert listening(port) == {("127.0.0.1", port)}
    finally:
        srv.close()
