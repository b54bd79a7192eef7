"""Ports and sockets on this host: a free loopback port, and which TCP sockets listen where."""
from __future__ import annotations

import ipaddress
import os
import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def listening(port: int | None = None, pids=None) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket on this host in LISTEN, from /proc/net/tcp{,6}; only `port`
    and only sockets of `pids` when given. '0.0.0.0' / '::' mean every interface."""
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
