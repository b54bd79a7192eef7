"""Process-group set-up for the EP ranks, driven by the executor.

The executor's rank 0 calls `find_free_port` on its own node and shares
(address, port) with every worker; each worker then calls
`init_process_group(rank, world_size, address, port)`. Nothing is read from
environment variables and no port is fixed. The group is torch.distributed's
default group (created on a TCPStore that rank 0 serves on `address` only, never
on every interface, and returned, so callers pass it on instead of reaching for
globals).
"""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the OS picks it). Call it where rank 0 will listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


def interface_for_address(addr: str) -> str | None:
    """The network interface that holds IPv4 `addr` on this host, or None.

    Gloo picks its interface from the host name, which on many machines
    resolves to 127.0.x.x; ranks on other nodes then dial loopback. Naming
    the interface that carries this node's cluster address avoids that.
    """
    import fcntl
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            if socket.inet_ntoa(packed[20:24]) == addr:
                return name
    return None


def backend_for_device(device: torch.device | str) -> str:
    """gloo for CPU tensors, nccl for CUDA tensors."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int, backend: str | None = None,
                       timeout_s: float = 60.0, device: torch.device | str | None = None,
                       local_addr: str | None = None) -> dist.ProcessGroup:
    """Join the group of `world_size` ranks whose rank 0 listens on master_addr:master_port; returns the group.

    backend: "gloo" or "nccl"; None chooses from `device` (CUDA → nccl, else
    gloo). "nccl" also gets a gloo side for CPU tensors ("cpu:gloo,cuda:nccl").
    timeout_s bounds the rendezvous and every collective, so a dead or missing
    peer surfaces as an error instead of a hang: gloo raises in the caller;
    NCCL's watchdog aborts the communicator (and by default the process).
    local_addr: this rank's address on the cluster network; gloo then talks
    over the interface that holds it (unless GLOO_SOCKET_IFNAME says otherwise).
    """
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0, world_size - 1)
    _check_int("master_port", master_port, 1, 65535)
    if not isinstance(master_addr, str) or not master_addr:
        raise ValueError(f"master_addr must be a host name or IP address, got {master_addr!r}.")
    if backend is None:
        backend = backend_for_device(device if device is not None else "cpu")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}.")
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process; call comm.destroy() first.")
    if local_addr and "GLOO_SOCKET_IFNAME" not in os.environ:
        iface = interface_for_address(local_addr)
        if iface is not None:
            # Read by gloo when the group is created; the process holds one group, so
            # setting it for the process is what we mean.
            os.environ["GLOO_SOCKET_IFNAME"] = iface
    kwargs = {}
    if backend == "nccl":
        backend = "cpu:gloo,cuda:nccl"
        if device is not None and torch.device(device).index is not None:
            kwargs["device_id"] = torch.device(device)  # eager NCCL init bound to this GPU
    timeout = datetime.timedelta(seconds=timeout_s)
    store = rendezvous_store(rank, world_size, master_addr, master_port, timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    return dist.group.WORLD


def rendezvous_store(rank: int, world_size: int, master_addr: str, master_port: int,
                     timeout: datetime.timedelta) -> dist.TCPStore:
    """The group's key-value store: rank 0 serves it on master_addr:master_port, the others connect.

    torch's own tcp:// rendezvous listens on every interface (*:PORT), which opens an
    unauthenticated store to the whole network even when the group only uses loopback. Here
    rank 0 binds the socket to master_addr, the address the group uses, and hands it to the store.
    """
    if rank != 0:
        return dist.TCPStore(master_addr, master_port, world_size, False, timeout)
    family, _, _, _, sockaddr = socket.getaddrinfo(master_addr, master_port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    # The store owns the listening socket from here on (it closes it, also when it fails to start).
    return dist.TCPStore(master_addr, master_port, world_size, True, timeout, master_listen_fd=sock.detach())


def destroy() -> None:
    """Tear down the process group of this process, if any (safe to call twice)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}.")


def side_group(master_addr: str, master_port: int, rank: int, world_size: int, group_name: str, backend: str,
               timeout_s: float, device: torch.device | str | None = None, store_timeout_s: float | None = None):
    """A group of its own beside the process's default one (a trainer and the engine's ranks exchanging weights,
    docs/rl.md): never the default group, so the engine's EP/TP groups are untouched. Rank 0 serves the store on
    master_addr:master_port (bound to that address only); its keys live where SGLang's `init_custom_process_group`
    (slime's, AReaL's and OpenRLHF's copies of it) puts them: the store wrapped in PrefixStore(group_name), then
    torch's own "<group_name>/" and "<device>/" prefixes (_new_process_group_helper's), so a trainer on that helper
    meets the engine's ranks (engine/rl/trainer.TrainerGroup makes the same keys). Returns (the backend's group, its
    store): keep the store while the group lives. gloo raises in the caller once `timeout_s` passes without a peer;
    NCCL's watchdog aborts.
    `store_timeout_s` (default `timeout_s`): the store's, for the rendezvous (torch's store client does not honour it
    against a listener that accepts and never answers: the caller bounds its own wait,
    engine/rl/rank/weight_sync.py)."""
    _check_int("world_size", world_size, 2)
    _check_int("rank", rank, 0, world_size - 1)
    _check_int("master_port", master_port, 1, 65535)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: choose from {', '.join(BACKENDS)}.")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = rendezvous_store(rank, world_size, master_addr, master_port,
                             timeout if store_timeout_s is None else datetime.timedelta(seconds=store_timeout_s))
    kind = "cuda" if backend == "nccl" else "cpu"
    prefixed = dist.PrefixStore(f"{kind}/", dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, store)))
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        group = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
    else:
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    return group, store


__all__ = ["BACKENDS", "backend_for_device", "destroy", "find_free_port", "init_process_group", "rendezvous_store",
           "side_group"]
