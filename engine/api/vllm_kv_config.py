"""vLLM's `--kv-transfer-config` (and `--kv-offloading-size`) on `moelink serve`: its JSON onto moelink's `--role`,
`--kv-*` and `--kv-offload-*` flags (engine/api/kv_args.py), before anything loads.

vLLM names a KV connector; moelink has one connector for prefill/decode disaggregation, over four transports
(tcp, shm, collective, nixl), and one host tier for the prefix cache. A vLLM connector that does what one of them
does is mapped onto it (`NixlConnector` is the nixl transport, `OffloadingConnector` the host tier, ...); the
others are refused by name with one line saying what to use (CONNECTORS below; docs/vllm-compat.md prints it).
"""
from __future__ import annotations

import argparse
import json
import os

# vLLM's kv_role -> moelink's --role.
KV_ROLES = {"kv_producer": "prefill", "kv_consumer": "decode", "kv_both": "both"}
KV_CONNECTOR = "MoelinkConnector"  # moelink's own name: the transport is --kv-transport (or extra config's)
OFFLOAD = "offload"  # CONNECTORS' mark of the host tier of the prefix cache

# vLLM's connectors (0.33.0's and earlier releases') -> moelink's transport, OFFLOAD, or None (refused). The text:
# what it is in moelink, or what to use instead.
CONNECTORS: dict[str, tuple[str | None, str]] = {
    KV_CONNECTOR: ("", "moelink's connector; the transport is kv_connector_extra_config.transport or --kv-transport "
                       "(default nixl where installed, else tcp)"),
    "NixlConnector": ("nixl", "the nixl transport (UCX): the decode server reads the prompt KV from the prefill "
                              "server, as vLLM's NixlConnector (= NixlPullConnector) does"),
    "NixlPullConnector": ("nixl", "the nixl transport, as NixlConnector"),
    "P2pNcclConnector": ("collective", "the collective transport: NCCL between GPU ranks (gloo on CPU)"),
    "PyNcclConnector": ("collective", "the collective transport: NCCL between GPU ranks (gloo on CPU)"),
    "OffloadingConnector": (OFFLOAD, "the prefix cache's host tier: cpu_bytes_to_use (over the tensor-parallel "
                                     "group) is --kv-offload-host-bytes per rank"),
    "SimpleCPUOffloadConnector": (OFFLOAD, "the prefix cache's host tier, as OffloadingConnector"),
    "MultiConnector": ("", "its connectors, each mapped as alone (at most one prefill/decode connector and one "
                           "offload tier)"),
    "NixlPushConnector": (None, "moelink's decode server reads the KV (no push mode): use NixlConnector"),
    "LMCacheConnectorV1": (None, "LMCache is not part of moelink: --kv-offload-host-bytes / --kv-offload-disk-bytes "
                                 "keep evicted prefix KV on this host; NixlConnector moves it between servers"),
    "LMCacheMPConnector": (None, "LMCache is not part of moelink: --kv-offload-host-bytes / --kv-offload-disk-bytes "
                                 "keep evicted prefix KV on this host; NixlConnector moves it between servers"),
    "MooncakeConnector": (None, "Mooncake's transfer engine is not part of moelink: use NixlConnector (RDMA through "
                                "UCX) or MoelinkConnector"),
    "MooncakeStoreConnector": (None, "external KV stores are not supported: --kv-offload-host-bytes / "
                                     "--kv-offload-disk-bytes keep evicted prefix KV on this host"),
    "HF3FSKVConnector": (None, "external KV stores are not supported: --kv-offload-host-bytes / "
                               "--kv-offload-disk-bytes keep evicted prefix KV on this host"),
    "FlexKVConnectorV1": (None, "external KV stores are not supported: --kv-offload-host-bytes / "
                                "--kv-offload-disk-bytes keep evicted prefix KV on this host"),
    "ExampleConnector": (None, "vLLM's example connector (KV files on shared storage): use NixlConnector for "
                               "prefill/decode, --kv-offload-disk-bytes for a disk tier"),
    "SharedStorageConnector": (None, "vLLM's example connector (KV files on shared storage): use NixlConnector for "
                                     "prefill/decode, --kv-offload-disk-bytes for a disk tier"),
    "ExampleHiddenStatesConnector": (None, "not supported: leave it out"),
    "DecodeBenchConnector": (None, "not supported: benchmark decode with benchmarks/ (docs/benchmarks.md)"),
    "HiSparseConnector": (None, "not supported: leave it out"),
    "MoRIIOConnector": (None, "ROCm's MoRI-IO is not part of moelink: use NixlConnector"),
}

# kv_connector_extra_config keys of a prefill/decode connector -> the --kv-* flag (namespace field) each sets.
KV_EXTRA = {"transport": "kv_transport", "host": "kv_host", "advertise_host": "kv_advertise_host",
            "ttl": "kv_ttl", "max_saved_bytes": "kv_max_saved_bytes", "fetch_timeout": "kv_fetch_timeout",
            "secret_file": "kv_secret_file", "peers": "kv_peers", "connect_timeout": "kv_connect_timeout",
            "first_byte_timeout": "kv_first_byte_timeout", "max_loads": "kv_max_loads",
            "max_loads_per_source": "kv_max_loads_per_source"}
KV_TOP = ("kv_connector", "kv_role", "kv_connector_extra_config", "kv_ip", "kv_port", "kv_buffer_device",
          "kv_load_failure_policy")
# vLLM's defaults where its connector has a port of its own and a script gives none: NIXL's side channel
# (VLLM_NIXL_SIDE_CHANNEL_PORT / _HOST), else KVTransferConfig.kv_port.
NIXL_PORT_ENV, NIXL_HOST_ENV, NIXL_DEFAULT_PORT = "VLLM_NIXL_SIDE_CHANNEL_PORT", "VLLM_NIXL_SIDE_CHANNEL_HOST", 5600
VLLM_DEFAULT_KV_PORT = 14579
FLAG = "--kv-transfer-config"


def apply_kv_transfer_config(ns: argparse.Namespace) -> None:
    """--kv-transfer-config and --kv-offloading-size onto --role and the --kv-* fields of `ns`; ValueError names the
    flag, the key and what is allowed."""
    _apply_offloading_size(ns)
    text = getattr(ns, "kv_transfer_config", None)
    if text is None:
        return
    try:
        cfg = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{FLAG} is not valid JSON ({exc}).") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{FLAG} must be a JSON object with kv_connector and kv_role.")
    role = cfg.get("kv_role")
    if role not in KV_ROLES:
        raise ValueError(f"{FLAG}: kv_role={role!r} is invalid: must be one of {', '.join(KV_ROLES)}.")
    _connector(ns, cfg, role, FLAG)


def _connector(ns: argparse.Namespace, cfg: dict, role: str, where: str) -> None:
    unknown = [k for k in cfg if k not in KV_TOP]
    if unknown:
        raise ValueError(f"{where}: {unknown[0]} is not supported: moelink takes {', '.join(KV_TOP)}.")
    name = cfg.get("kv_connector")
    if name not in CONNECTORS:
        raise ValueError(f"{where}: kv_connector={name!r} is not supported: moelink takes "
                         f"{', '.join(n for n, (t, _) in CONNECTORS.items() if t is not None)} (docs/vllm-compat.md).")
    transport, says = CONNECTORS[name]
    if transport is None:
        raise ValueError(f"{where}: kv_connector={name!r} is not supported by moelink: {says}.")
    extra = cfg.get("kv_connector_extra_config") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"{where}: kv_connector_extra_config must be a JSON object.")
    if name == "MultiConnector":
        _multi(ns, cfg, extra, role, where)
    elif transport == OFFLOAD:
        _offload(ns, cfg, extra, where)
    else:
        _pd(ns, cfg, extra, role, transport, where)


def _pd(ns: argparse.Namespace, cfg: dict, extra: dict, role: str, transport: str, where: str) -> None:
    """A prefill/decode connector: --role, its transport, --kv-port / --kv-host and the extra config's --kv-*."""
    if ns.role not in ("both", KV_ROLES[role]):
        raise ValueError(f"{where}: kv_role={role!r} and --role {ns.role} disagree: give one of them.")
    if getattr(ns, "pd_connector", None) is not None:
        raise ValueError(f"{where}: kv_connector={cfg['kv_connector']!r} is a second prefill/decode connector "
                         f"beside {ns.pd_connector!r}: give one.")
    ns.pd_connector = cfg["kv_connector"]
    ns.role = KV_ROLES[role]
    nixl = transport == "nixl"
    for key, value in extra.items():
        if nixl and key == "backends":  # vLLM's NIXL backends: moelink's NIXL runs UCX
            if value not in (["UCX"], ("UCX",)):
                raise ValueError(f"{where}: kv_connector_extra_config.backends={value!r} is not supported: "
                                 "moelink's NIXL transport runs UCX (\"backends\": [\"UCX\"]).")
            continue
        if key not in KV_EXTRA:
            raise ValueError(f"{where}: kv_connector_extra_config.{key} is not supported: moelink takes "
                             f"{', '.join(KV_EXTRA)}{', backends' if nixl else ''}.")
        setattr(ns, KV_EXTRA[key], value)
    if transport:  # a vLLM connector names its transport; --kv-transport or extra config's may only agree
        if ns.kv_transport not in (None, transport):
            raise ValueError(f"{where}: kv_connector={cfg['kv_connector']!r} moves KV over {transport} and "
                             f"--kv-transport {ns.kv_transport} disagrees: give one of them.")
        ns.kv_transport = transport
    if "kv_port" in cfg:
        ns.kv_port = _int(where, "kv_port", cfg["kv_port"])
    elif transport and ns.role != "decode" and ns.kv_port is None:
        # vLLM's connectors have a port by default (NIXL's side channel, else kv_port's default): a vLLM launch
        # line names none. A decode server serves nothing.
        ns.kv_port = int(os.environ.get(NIXL_PORT_ENV, NIXL_DEFAULT_PORT)) if nixl else VLLM_DEFAULT_KV_PORT
    if "kv_ip" in cfg:
        ns.kv_host = str(cfg["kv_ip"])
    elif nixl and os.environ.get(NIXL_HOST_ENV) and "host" not in extra:
        ns.kv_host = os.environ[NIXL_HOST_ENV]
    device = cfg.get("kv_buffer_device")
    if device is not None:  # where the KV waits for its reader: in the device's cache, or copied to host memory
        if not nixl or device not in ("cuda", "cpu"):
            raise ValueError(f"{where}: kv_buffer_device={device!r} is not supported: moelink takes \"cuda\" (the "
                             "blocks read in place) or \"cpu\" (copied to host memory) over NIXL.")
        ns.kv_nixl_in_place = device == "cuda"
    policy = cfg.get("kv_load_failure_policy")
    if policy not in (None, "recompute"):
        raise ValueError(f"{where}: kv_load_failure_policy={policy!r} is not supported: moelink's decode server "
                         "computes a prompt whose KV did not arrive (\"recompute\").")
    if ns.role == "prefill" and ns.kv_port is None:
        raise ValueError(f"{where}: kv_role kv_producer needs kv_port (the first port this prefill server serves "
                         "its saved KV on).")


def _offload(ns: argparse.Namespace, cfg: dict, extra: dict, where: str) -> None:
    """vLLM's CPU offloading connector: the prefix cache's host tier (--kv-offload-host-bytes, per rank)."""
    name = cfg["kv_connector"]  # any kv_role: the tier is this server's own prefix cache's, beside any PD role
    for key in cfg:
        if key not in ("kv_connector", "kv_role", "kv_connector_extra_config"):
            raise ValueError(f"{where}: {key} is not supported with kv_connector={name!r}: moelink takes "
                             "kv_connector_extra_config.cpu_bytes_to_use.")
    for key in extra:
        if key != "cpu_bytes_to_use":
            raise ValueError(f"{where}: kv_connector_extra_config.{key} is not supported with "
                             f"kv_connector={name!r}: moelink takes cpu_bytes_to_use (its host tier's blocks are "
                             "the cache's own, --block-size).")
    if "cpu_bytes_to_use" not in extra:
        raise ValueError(f"{where}: kv_connector={name!r} needs kv_connector_extra_config.cpu_bytes_to_use (bytes "
                         "of host memory for the KV the prefix cache evicts).")
    _set_host_bytes(ns, _int(where, "kv_connector_extra_config.cpu_bytes_to_use", extra["cpu_bytes_to_use"]),
                    f"{where} cpu_bytes_to_use")


def _multi(ns: argparse.Namespace, cfg: dict, extra: dict, role: str, where: str) -> None:
    children = extra.get("connectors")
    if set(extra) != {"connectors"} or not isinstance(children, list) or not children:
        raise ValueError(f"{where}: kv_connector=\"MultiConnector\" takes kv_connector_extra_config "
                         "{\"connectors\": [...]} (a list of connector configs) and nothing else.")
    for i, child in enumerate(children):
        at = f"{where} connectors[{i}]"
        if not isinstance(child, dict):
            raise ValueError(f"{at} must be a JSON object with kv_connector.")
        if child.get("kv_connector") == "MultiConnector":
            raise ValueError(f"{at}: a MultiConnector inside a MultiConnector is not supported: list the "
                             "connectors once.")
        child_role = child.get("kv_role", role)
        if child_role != role:
            raise ValueError(f"{at}: kv_role={child_role!r} and the MultiConnector's {role!r} disagree.")
        _connector(ns, {**child, "kv_role": role}, role, at)


def _apply_offloading_size(ns: argparse.Namespace) -> None:
    """vLLM's --kv-offloading-size GiB (over the tensor-parallel group) as --kv-offload-host-bytes (per rank)."""
    gib = getattr(ns, "kv_offloading_size", None)
    if gib is None:
        return
    if gib <= 0:
        raise ValueError(f"--kv-offloading-size={gib} is invalid: must be > 0 (GiB of host memory).")
    _set_host_bytes(ns, int(gib * (1 << 30)), "--kv-offloading-size")


def _set_host_bytes(ns: argparse.Namespace, total: int, flag: str) -> None:
    per_rank = total // max(1, getattr(ns, "tensor_parallel_size", 1))
    if ns.kv_offload_host_bytes not in (None, per_rank):
        raise ValueError(f"{flag} ({per_rank} bytes per rank) and --kv-offload-host-bytes "
                         f"{ns.kv_offload_host_bytes} disagree: give one of them.")
    ns.kv_offload_host_bytes = per_rank


def _int(flag: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{flag}: {key}={value!r} is invalid: must be an integer.")
    return value


def connector_table() -> str:
    """docs/vllm-compat.md's table of connectors."""
    lines = ["| `kv_connector` | moelink | what it is here, or what to use |", "|---|---|---|"]
    for name, (transport, says) in CONNECTORS.items():
        how = ("refused" if transport is None else "host tier" if transport == OFFLOAD
               else f"transport `{transport}`" if transport else "accepted")
        lines.append(f"| `{name}` | {how} | {says} |")
    return "\n".join(lines)
