"""Which network interfaces a rank's NIXL agents let UCX use (docs/security.md, issue 53).

UCX's TCP transport opens a listener on every interface it is allowed (measured: a prefill and a decode agent
each listened on eth0 beside loopback with moelink's defaults), whatever address the KV side channel was told to
bind. So each agent is made with `UCX_NET_DEVICES` set to the interfaces the server was told to use: the one that
holds `--kv-host` for a rank that serves KV, and for a rank that loads, the ones its configured peers
(`--kv-peers`; loopback when none) are reached through. A wildcard host (0.0.0.0, ::) asks for every interface, and
then nothing is narrowed; an operator's own `UCX_NET_DEVICES` always wins. The names are looked up on the rank's own
machine when its agent is made (a Ray rank on another node has other interface names). RDMA devices
(`mlx5_0:1`: InfiniBand, RoCE) stay in the list: they open no listener, and they are what carries the KV between
nodes at speed.
"""
from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct
import threading

logger = logging.getLogger(__name__)

ENV = "UCX_NET_DEVICES"
WILDCARDS = frozenset({"0.0.0.0", "::", ""})
_SIOCGIFADDR = 0x8915
_ENV_LOCK = threading.Lock()  # the variable is the process's: set and restored around one agent's creation


def _ipv4_of(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:  # no IPv4 address on it
            return None
    return socket.inet_ntoa(raw[20:24])


def _ipv6_addresses() -> dict[str, str]:
    out = {}
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6:
                    out[str(ipaddress.IPv6Address(bytes.fromhex(parts[0])))] = parts[5]
    except OSError:  # no IPv6 on this machine
        pass
    return out


def interface_of(address: str) -> str | None:
    """The name of this machine's interface that holds `address` (an IP literal), or None."""
    ip = str(ipaddress.ip_address(address))
    if ":" in ip:
        return _ipv6_addresses().get(ip)
    for _, name in socket.if_nameindex():
        if _ipv4_of(name) == ip:
            return name
    return None


def _local_address_towards(host: str) -> str | None:
    """The local address this machine's routes would send to `host` from (no packet is sent), or None."""
    try:
        infos = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, kind, proto, _, addr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.connect(addr)
                return s.getsockname()[0]
        except OSError:
            continue
    return None


def devices_for(listen_host: str | None, peer_hosts: tuple[str, ...] | None) -> str | None:
    """The `UCX_NET_DEVICES` value for a rank that listens on `listen_host` (None: serves no KV) and loads from
    `peer_hosts` (None: loads nothing; () loopback only), or None: every interface (a wildcard host, or an
    address this machine does not hold: UCX is then left as it is, and says so in the log)."""
    wanted = []
    if listen_host is not None:
        wanted.append(listen_host)
    if peer_hosts is not None:
        wanted += list(peer_hosts) or ["127.0.0.1"]
    names = []
    for host in wanted:
        if host in WILDCARDS:
            return None
        local = host if _is_ip(host) and _is_local(host) else _local_address_towards(host)
        name = interface_of(local) if local is not None else None
        if name is None:
            logger.warning("KV over NIXL: no interface of this machine found for %r; UCX may use every interface "
                           "(set %s to narrow it)", host, ENV)
            return None
        if name not in names:
            names.append(name)
    return ",".join(names + rdma_devices()) if names else None


def rdma_devices(root: str = "/sys/class/infiniband") -> list[str]:
    """This machine's RDMA device ports as UCX names them (`mlx5_0:1`); none on a machine without any."""
    try:
        devices = sorted(os.listdir(root))
    except OSError:
        return []
    out = []
    for dev in devices:
        try:
            ports = sorted(os.listdir(os.path.join(root, dev, "ports")), key=lambda p: int(p) if p.isdigit() else 0)
        except OSError:
            continue
        out += [f"{dev}:{port}" for port in ports]
    return out


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _is_local(address: str) -> bool:
    return interface_of(address) is not None


class narrowed_env:
    """`UCX_NET_DEVICES` set to `devices` while a NIXL agent (its UCX context) is made, then restored; nothing when
    `devices` is None or the operator set the variable."""

    def __init__(self, devices: str | None) -> None:
        self.devices = devices

    def __enter__(self) -> None:
        _ENV_LOCK.acquire()
        self._set = self.devices is not None and ENV not in os.environ
        if self._set:
            os.environ[ENV] = self.devices

    def __exit__(self, *exc) -> None:
        try:
            if self._set:
                os.environ.pop(ENV, None)
        finally:
            _ENV_LOCK.release()


__all__ = ["ENV", "devices_for", "interface_of", "narrowed_env", "rdma_devices"]
