"""Which prefill engines a decode engine may fetch KV from: host names and addresses checked as such, and the
allow-list of peers (`--kv-peers`, `RemoteKVConfig.peers`) every request's kv_transfer_params must fall inside.

A request names its KV source (remote_host, remote_port, remote_ranks); a decode engine dials it and sends it
the prompt's token ids and the capability. Left to the request, that is a way to make the decode engine connect
anywhere (a port-scan oracle, a KV source of the client's choosing), so the source must be one of the peers the
operator configured. A peer is `HOST[:PORT[-PORT]]` (an IPv6 literal in brackets when a port follows): the host
exactly as requests name it (names compare case-insensitively, IP literals by value; no DNS lookups here), and
the ports a prefill engine's ranks serve on (`remote_port + [0, remote_ranks)` must all be inside). No peers
configured (None) means loopback only: 127.0.0.0/8, ::1 and "localhost", any port: the one-host default.

Host names follow RFC 1123 (letters, digits and hyphens in dot-separated labels of 1-63 characters, 253 in
all); IP literals are what `ipaddress` parses. Nothing else is a host here: no '/', no '..', no spaces, no
URLs (the shared-memory transport derives a socket path from the host, engine/kv_transfer/shm.py).
"""
from __future__ import annotations

import ipaddress

from moelink.engine.contract.kv_transfer_params import is_host
from moelink.engine.contract.loopback import is_loopback
from moelink.engine.contract.safe_text import shown


def _ip(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _norm(host: str) -> str:
    ip = _ip(host)
    return host.lower() if ip is None else ip.compressed


def parse_peer(text: str) -> tuple[str, int, int]:
    """"HOST[:PORT[-PORT]]" -> (host, first port, last port); ValueError says what is allowed."""
    allowed = ("must be HOST, HOST:PORT or HOST:PORT-PORT (HOST a host name or IP address, an IPv6 address in "
               "brackets when a port follows; ports 1-65535)")
    if not isinstance(text, str) or not text:
        raise ValueError(f"a KV peer of {shown(text)} is invalid: it {allowed}.")
    host, ports = text, ""
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1:] if end > 0 else ""
        if end < 0 or (rest and not rest.startswith(":")):
            raise ValueError(f"a KV peer of {shown(text)} is invalid: it {allowed}.")
        ports = rest[1:]
    elif text.count(":") == 1:
        host, ports = text.split(":")
    try:
        lo, _, hi = ports.partition("-")
        first, last = (int(lo), int(hi or lo)) if ports else (1, 65535)
    except ValueError:
        raise ValueError(f"a KV peer of {shown(text)} is invalid: it {allowed}.") from None
    if not is_host(host) or not 1 <= first <= last <= 65535:
        raise ValueError(f"a KV peer of {shown(text)} is invalid: it {allowed}.")
    return _norm(host), first, last


def parse_peers(text: str) -> tuple[tuple[str, int, int], ...]:
    """"PEER,PEER,..." (`--kv-peers`) -> peers; ValueError names the bad one."""
    return tuple(parse_peer(p.strip()) for p in text.split(",") if p.strip())


def peer_allowed(peers, host: str, port: int, num_ranks: int = 1) -> bool:
    """Whether ports port + [0, num_ranks) of `host` are inside `peers` (None: loopback, any port)."""
    if not is_host(host):
        return False
    if peers is None:
        return is_loopback(host)
    h, last = _norm(host), port + num_ranks - 1
    return any(h == ph and lo <= port and last <= hi for ph, lo, hi in peers)


def describe_peers(peers) -> str:
    """The allow-list in words (startup line, refusals)."""
    if peers is None:
        return "loopback only (127.0.0.0/8, ::1, localhost; any port)"
    if not peers:
        return "none"

    def one(h, lo, hi):
        h = f"[{h}]" if ":" in h else h
        return h if (lo, hi) == (1, 65535) else f"{h}:{lo}" if lo == hi else f"{h}:{lo}-{hi}"

    return ", ".join(one(*p) for p in peers)


__all__ = ["describe_peers", "is_host", "is_loopback", "parse_peer", "parse_peers", "peer_allowed"]
