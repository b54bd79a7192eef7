"""Whether a TCP port can be bound here, and whether a given process is the one listening on it.

The managed gateway needs both: an HTTP port another server already answers on must be refused before the
gateway is said to serve (the other server would answer its readiness probe), and a gateway that is ready must
be the one this server started, not a process that took the port in between.
"""
from __future__ import annotations

import os
import socket
from typing import Optional

_LISTEN = "0A"  # the state column of /proc/net/tcp{,6}


def bind_error(host: str, port: int) -> Optional[str]:
    """Why `host:port` cannot be bound right now (e.g. 'Address already in use'), or None when it can.

    Bound with SO_REUSEADDR, as servers bind: a port whose last connections linger in TIME_WAIT is free, one
    with a listener is not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        return exc.strerror
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def listens_on(pid: int, port: int) -> Optional[bool]:
    """Whether process `pid` holds a socket listening on TCP `port` (any address); None where this cannot be
    read (no /proc: not Linux)."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False  # exited (or not ours to read, which a child of this process always is)
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            return True
    return False


def _listening_inodes(port: int) -> Optional[set[int]]:
    """Socket inodes of every TCP listener on `port`, IPv4 and IPv6, in this network namespace."""
    found, readable = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()  # sl local_address rem_address st ... uid timeout inode
            if fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(fields[9]))
    return found if readable else None
