"""Whether a host stays on this machine: the one rule every listener and peer check of moelink uses. No torch."""
from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = frozenset({"localhost"})


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (an IPv6 literal in brackets or not) or the name "localhost" (any case; no lookup)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() in LOOPBACK_NAMES


__all__ = ["LOOPBACK_NAMES", "is_loopback"]
