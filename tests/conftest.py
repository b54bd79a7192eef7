"""Shared fixtures: tiny random Hugging Face checkpoints built once per session."""
from __future__ import annotations

import os

import pytest
import torch

# Two cores on CI: torch's intra-op threads plus pytest is plenty.
torch.set_num_threads(min(2, os.cpu_count() or 1))

from tiny_configs import TINY_CONFIGS  # noqa: E402  (tests/ is on sys.path via this conftest)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(name) → path of that tiny checkpoint (built on first use)."""
    from moelink.engine.tiny_model import make_tiny_model

    built: dict[str, str] = {}

    def get(name: str, **overrides) -> str:
        key = name + repr(sorted(overrides.items()))
        if key not in built:
            cfg = dict(TINY_CONFIGS[name], **overrides)
            out = tmp_path_factory.mktemp(name)
            built[key] = str(make_tiny_model(out, **cfg))
        return built[key]

    return get



def _socket_inodes(pids) -> set[int]:
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _listening(port: int | None = None, pids=None) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket on this host in LISTEN, from /proc/net/tcp{,6}; only `port`
    and only sockets of `pids` when given. '0.0.0.0' / '::' mean every interface."""
    import ipaddress

    inodes = _socket_inodes(pids) if pids is not None else None
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr_hex, port_hex = fields[1].split(":")
            if fields[3] != "0A" or (port is not None and int(port_hex, 16) != port):  # 0A: LISTEN
                continue
            if inodes is not None and int(fields[9]) not in inodes:
                continue
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            raw = b"".join(bytes.fromhex(addr_hex[i:i + 8])[::-1] for i in range(0, width, 8))
            ip = ipaddress.ip_address(raw)
            found.add((str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip), int(port_hex, 16)))
    return found


@pytest.fixture(scope="session")
def listening():
    """listening(port=None, pids=None) → {(address, port)} of the TCP sockets listening on this host."""
    return _listening
