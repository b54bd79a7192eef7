"""Ports and sockets on this host: a free loopback port, and which TCP sockets listen where."""
from __future__ import annotations

import ipaddress
import os
import socket


def _ephemeral_low() -> int:
    """The lowest port the OS hands out to outgoing connections (ip_local_port_range; 32768 by default)."""
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(count: int = 1) -> int:
    """A TCP port free on 127.0.0.1 right now, with the `count - 1` ports after it free too (a server of several
    ranks listens on port + rank). Taken below the OS's ephemeral range: a port the OS picks there (bind to 0) can be
    handed to another process's outgoing connection before the test's server binds it, and port + 1 was never
    checked at all (seen: "Address already in use" on an EP 2 prefill server's second rank)."""
    import random

    low = _ephemeral_low()
    rng = random.Random()  # each xdist worker its own sequence: two never walk the same ports in step
    for _ in range(200):
        base = rng.randrange(20000, max(20001, low - count))
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1 below {low}")


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
