"""Who may use the KV plane: a deployment secret both engines prove they hold, and per-request capabilities.

Peers. Every KV connection starts with a handshake, before anything else on it is read or sent (the transports,
engine/kv_transfer/server.py and client.py, run it; a NIXL data plane would run the same one on its side
channel). The decode side (client) says hello with a fresh 32-byte nonce; the prefill side (server) answers with
its own nonce and, when the deployment has a secret, its proof HMAC-SHA256(secret, "moelink-kv server" | client
nonce | server nonce); the client checks it (constant time) and only then proves itself with HMAC-SHA256(secret,
"moelink-kv client" | server nonce | client nonce). So a decode engine sends a prompt's token ids and its
capability only to a peer that holds the secret, and a prefill engine reads a request only from one. Both proofs
are over both fresh nonces (no replay) and labelled by direction (a peer's proof cannot be reflected back as the
other's). Every handshake message is at most MAX_HELLO_BYTES and the whole handshake runs against the caller's
deadline (a few seconds from accept or connect). Versions: a hello of another protocol version, or none (a peer
of moelink before version 2), gets one clear refusal naming both versions; a version that is not a JSON integer
(3.0 included), or a nonce that is not 64 hex digits, is refused naming the field and what is required.

The secret: `--kv-secret-file PATH` (a file no other user may read) or the MOELINK_KV_SECRET environment
variable, at least MIN_SECRET_BYTES bytes, the same on every prefill and decode server of a deployment. Required
whenever a KV listener or peer is not on loopback (engine/kv_transfer/remote.py refuses the config otherwise);
without one (loopback only) the handshake authenticates nobody, and a decode engine does not register what it
loads for prefix reuse (the prefill side cannot be told apart from another local process, scheduler/kv_connector.py).

Capabilities. A prefill engine saves each request's KV under a fresh random 128-bit token (`new_capability`), not
under anything derived from request ids, and hands it out only in that request's own output
(kv_transfer_params.remote_kv_token); a fetch must name it and prove the whole prompt (engine/kv_transfer/server.py).
What a request's KV depends on besides its tokens (its cache salt: its images' hashes, its LoRA adapter) is bound
into the key the save is stored under and the fetch asks for (`salted_key`): a decode request whose images differ
from the prefill request's finds no KV under the same capability and is recomputed, so no KV of other images ever
reaches its blocks (or its prefix cache).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import socket
import stat
from typing import Protocol

from moelink.engine.contract.kv_transfer_params import is_kv_token as is_capability

from .tp_shard import CAPABILITY_CHARS
from .wire import MAX_HELLO_BYTES, VERSION, Deadline, KVFetchError, recv_header, send_header

SECRET_ENV = "MOELINK_KV_SECRET"
MIN_SECRET_BYTES = 16
NONCE_BYTES = 32
CAPABILITY_BYTES = 16  # 128 random bits
_HMAC = "hmac-sha256"


def salted_key(token: str, cache_salt: bytes) -> str:
    """The key a save of `token` (a capability, with its `-tp<P>` suffix when saved by a TP group: tp_shard.py) is
    stored under and fetched by, for a request whose KV also depends on `cache_salt` (scheduler Request.cache_salt:
    its images' hashes, its adapter); `token` itself for a plain prompt. Both sides derive it from their own
    request, so equal tokens with other images ask for a key nothing is saved under (NO_KV: recomputed). The
    capability part is replaced by 22 URL-safe characters of SHA-256(capability | salt): the key keeps a token's
    alphabet and length, so the TP suffix and the shard asks read it as they read a token."""
    if not cache_salt:
        return token
    cap, rest = token[:CAPABILITY_CHARS], token[CAPABILITY_CHARS:]
    digest = hashlib.sha256(b"moelink-kv salted key|" + cap.encode() + b"|" + cache_salt).digest()
    return base64.urlsafe_b64encode(digest).decode()[:CAPABILITY_CHARS] + rest


class KVRefused(Exception):
    """The server refuses this connection; the message (one sentence) is sent to the peer."""


def new_capability() -> str:
    """A fresh capability: 128 random bits, URL-safe text (22 characters)."""
    return secrets.token_urlsafe(CAPABILITY_BYTES)


def load_secret(path: str | None = None, env=None) -> bytes | None:
    """The deployment secret from `path` (`--kv-secret-file`) or the MOELINK_KV_SECRET variable of `env`
    (os.environ), surrounding whitespace stripped; None when neither is given. ValueError names the flag: a file
    any other user may read or write, one that cannot be read, or a secret shorter than MIN_SECRET_BYTES."""
    env = os.environ if env is None else env
    if path is not None:
        try:
            st = os.stat(path)
            with open(path, "rb") as f:
                secret = f.read(1 << 16).strip()
        except OSError as exc:
            raise ValueError(f"--kv-secret-file={path!r} is invalid: it cannot be read ({exc.strerror}).") from None
        if st.st_mode & (stat.S_IRWXO | stat.S_IWGRP):
            raise ValueError(f"--kv-secret-file={path!r} is invalid: its mode {stat.S_IMODE(st.st_mode):04o} lets other "
                             f"users read or change it; allowed: readable by its owner (and group) only, e.g. chmod 600.")
        where = f"--kv-secret-file={path!r}"
    elif env.get(SECRET_ENV):
        secret, where = env[SECRET_ENV].strip().encode(), SECRET_ENV
    else:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{where} is invalid: the KV secret has {len(secret)} bytes; at least {MIN_SECRET_BYTES} "
                         f"are allowed (e.g. `openssl rand -hex 32`).")
    return secret


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes) -> str:
    return hmac.new(secret, b"moelink-kv " + label + b"|" + first + second, hashlib.sha256).hexdigest()


def _same(proof, expected: str) -> bool:
    """A peer's proof against the expected one, in constant time (any non-string is simply wrong)."""
    return isinstance(proof, str) and hmac.compare_digest(proof.encode("utf-8", "replace"), expected.encode())


def _nonce_problem(value) -> str | None:
    """What is wrong with a peer's nonce field (a clause), or None for 2 * NONCE_BYTES hex digits. Only its type
    and length are described: the peer's bytes are never echoed."""
    if value is None:
        return "is missing"
    if not isinstance(value, str):
        return f"is a JSON {_json_kind(value)}, not a string"
    if len(value) != 2 * NONCE_BYTES:
        return f"has {len(value)} characters"
    # bytes.fromhex skips whitespace, so a 64-character string with spaces in it would decode to fewer bytes.
    if not all(c in "0123456789abcdefABCDEF" for c in value):
        return "is not hexadecimal"
    return None


def _json_kind(value) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), "value")


def _nonce(value) -> bytes | None:
    return None if _nonce_problem(value) is not None else bytes.fromhex(value)


def _hello_refusal(hello: dict) -> str | None:
    """Why a client's hello is refused (one sentence naming the field, what it holds and what is allowed), or None.
    The version comes first: a peer of another version is told that, whatever else its hello lacks."""
    v = hello.get("v")
    if v is None:  # moelink before protocol version 2 sent no version in its first message
        return (f"a KV peer of protocol version below 2 (its hello has no 'v'): this server speaks version {VERSION} "
                f"{_SAME_VERSION}")
    if isinstance(v, bool) or not isinstance(v, int):
        # 3.0 is not version 3 (nor below 2): the field is simply not an integer.
        return (f"the hello's protocol version 'v' is a JSON {_json_kind(v)} ({v!r:.20}), not an integer: this "
                f"server speaks version {VERSION} {_SAME_VERSION}")
    if v != VERSION:
        return f"a KV peer of protocol version {v}: this server speaks version {VERSION} {_SAME_VERSION}"
    problem = _nonce_problem(hello.get("hello"))
    if problem is not None:
        return (f"the hello's client nonce 'hello' {problem}: protocol version {VERSION} requires exactly "
                f"{2 * NONCE_BYTES} hex digits (a fresh {NONCE_BYTES}-byte nonce)")
    return None


_SAME_VERSION = "(run the same moelink version on prefill and decode servers)"


class PeerAuth(Protocol):
    """The handshake seam (module docstring): a transport calls `client` right after connecting and `server` right
    after accepting, each within the deadline it gives; both raise on failure (KVFetchError on the client side,
    KVRefused or KVFetchError on the server side). `authenticated`: whether a completed handshake proves the peer
    holds the deployment secret."""

    authenticated: bool

    def client(self, sock: socket.socket, deadline: Deadline, where: str) -> None: ...

    def server(self, sock: socket.socket, deadline: Deadline) -> None: ...


class SecretAuth:
    """PeerAuth by the deployment secret (None: no secret, loopback only: the handshake checks versions only)."""

    def __init__(self, secret: bytes | None) -> None:
        self._secret = secret
        self.authenticated = secret is not None

    def __repr__(self) -> str:  # never the secret
        return f"SecretAuth(authenticated={self.authenticated})"

    def client(self, sock: socket.socket, deadline: Deadline, where: str) -> None:
        cn = secrets.token_bytes(NONCE_BYTES)
        send_header(sock, {"v": VERSION, "hello": cn.hex(), "auth": _HMAC if self._secret else "none"}, deadline)
        reply = recv_header(sock, deadline, MAX_HELLO_BYTES)
        if reply.get("ok") is not True:
            raise KVFetchError(f"{where} refused: {reply.get('error', 'no reason given')}")
        sn = _nonce(reply.get("nonce"))
        if reply.get("v") != VERSION or sn is None:
            raise KVFetchError(f"{where} is not a KV server of protocol version {VERSION}")
        if self._secret is None:
            return
        proof = reply.get("proof")
        if not _same(proof, _mac(self._secret, b"server", cn, sn)):
            raise KVFetchError(f"{where} did not prove the deployment's KV secret: not a trusted prefill peer "
                               f"(give both servers the same --kv-secret-file)")
        send_header(sock, {"proof": _mac(self._secret, b"client", sn, cn)}, deadline)

    def server(self, sock: socket.socket, deadline: Deadline) -> None:
        hello = recv_header(sock, deadline, MAX_HELLO_BYTES)
        refusal = _hello_refusal(hello)
        if refusal is not None:
            raise KVRefused(refusal)
        cn = bytes.fromhex(hello["hello"])
        auth = hello.get("auth")
        if self._secret is not None and auth != _HMAC:
            raise KVRefused("this KV server requires the deployment's KV secret: start the decode server with the "
                            "same --kv-secret-file (or MOELINK_KV_SECRET)")
        if self._secret is None and auth != "none":
            raise KVRefused("this KV server has no KV secret: give the prefill server the same --kv-secret-file")
        sn = secrets.token_bytes(NONCE_BYTES)
        reply = {"ok": True, "v": VERSION, "nonce": sn.hex()}
        if self._secret is not None:
            reply["proof"] = _mac(self._secret, b"server", cn, sn)
        send_header(sock, reply, deadline)
        if self._secret is None:
            return
        proof = recv_header(sock, deadline, MAX_HELLO_BYTES).get("proof")
        if not _same(proof, _mac(self._secret, b"client", sn, cn)):
            raise KVRefused("authentication failed: the peer did not prove the deployment's KV secret")


NO_SECRET = SecretAuth(None)


__all__ = ["CAPABILITY_BYTES", "KVRefused", "MIN_SECRET_BYTES", "NO_SECRET", "PeerAuth", "SECRET_ENV", "SecretAuth",
           "is_capability", "load_secret", "new_capability", "salted_key"]
