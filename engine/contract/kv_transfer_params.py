"""Per-request prefill/decode disaggregation parameters (vLLM's `kv_transfer_params`), validated where made.

A request to the prefill engine says `do_remote_decode=True`: its prompt KV is saved once computed and served to
a decode engine (it usually runs with max_tokens=1). The request to the decode engine says
`do_remote_prefill=True` and where that KV is: the prefill engine's host, its KV port (`remote_port`; rank r of an
engine with `remote_ranks` ranks serves on remote_port + r, since data-parallel attention keeps a request's KV on
the one rank that computed it) and the capability the KV was saved under (`remote_kv_token`: 128 random bits the
prefill engine issued for this one save, engine/kv_transfer/auth.py; whoever holds it may fetch that KV once, for
exactly that prompt). The prefill engine's connector writes these into the request's output
(engine/kv_transfer/remote.py); a router passes them on unchanged. vLLM's NixlConnector names the same things
remote_host, remote_port and remote_request_id (kept, for routers that read it; not the key); block ids are not
carried, because the prefill side copies the blocks to host memory when it saves them and frees its own at once.

`remote_host` is a host name (RFC 1123) or an IP address, nothing else; which hosts and ports a decode engine
accepts is its own configuration (engine/kv_transfer/peers.py), checked when a request is added.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, fields
from typing import Optional

from .safe_text import shown

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_KV_TOKEN = re.compile(r"[A-Za-z0-9_-]{22,128}\Z")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}\Z")
MAX_MM_HASHES = 128  # images and videos of one prompt (limit_mm_per_prompt is 16 images by default): ~8.5 KiB of JSON


def is_host(host) -> bool:
    """A host name per RFC 1123 (dot-separated labels of letters, digits and inner hyphens, 1-63 characters each,
    253 in all) or an IP address literal: never a path, a URL or anything with '/' or '..'."""
    if not isinstance(host, str) or not 0 < len(host) <= 253:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return all(_LABEL.match(label) for label in host.split("."))


def is_kv_token(value) -> bool:
    """A capability's shape: 22 to 128 URL-safe base64 characters (a prefill engine issues 22: 128 bits)."""
    return isinstance(value, str) and _KV_TOKEN.match(value) is not None


@dataclass(frozen=True)
class KVTransferParams:
    """Where a request's prompt KV goes or comes from (module docstring)."""

    do_remote_decode: bool = False  # prefill side: save this request's prompt KV for a decode engine
    do_remote_prefill: bool = False  # decode side: load the prompt KV another engine saved
    remote_host: Optional[str] = None
    remote_port: Optional[int] = None
    # The ports to ask, remote_port + [0, ranks): the prefill engine's ranks (its expert_parallel_size), or under TP
    # the request's TP group's ranks (remote_port its first rank's).
    remote_ranks: int = 1
    remote_request_id: Optional[str] = None  # the prefill request's id: informational (vLLM's key), not the key
    remote_kv_token: Optional[str] = None  # the capability the KV was saved under (module docstring)
    # A multimodal prompt's item hashes as the prefill engine computed them from the pixels (sha256 hex, its images
    # then its videos, in order: what salts its KV, engine/kv_transfer/auth.salted_key), relayed to a decode
    # request that comes without the pixels (smg's PD mode sends the decode leg the grids alone): its KV is then
    # fetched under these hashes. Forged ones open no save (the salted key binds the capability to the prefill's
    # own) and such a request can never be recomputed (docs/multimodal.md). None: not a multimodal save.
    mm_hashes: Optional[tuple[str, ...]] = None
    # Set by a prefill server's role default (engine/server/pd_role.py), never by a client: the request did not ask
    # for a handoff itself, so its save is copied to host memory rather than held in the cache (a client that never
    # fetches must not hold the pool: docs/security-kv.md). Not part of vLLM's JSON shape.
    by_role_default: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.do_remote_decode, bool), "do_remote_decode", self.do_remote_decode, "must be True or False")
        _check(isinstance(self.do_remote_prefill, bool), "do_remote_prefill", self.do_remote_prefill,
               "must be True or False")
        _check(not (self.do_remote_decode and self.do_remote_prefill), "do_remote_prefill", self.do_remote_prefill,
               "cannot be set with do_remote_decode (one engine prefills, the other decodes)")
        _check(_is_int(self.remote_ranks) and 1 <= self.remote_ranks <= 1024, "remote_ranks", self.remote_ranks,
               "must be an integer in [1, 1024]")
        if isinstance(self.mm_hashes, list):  # vLLM's JSON shape has arrays
            object.__setattr__(self, "mm_hashes", tuple(self.mm_hashes))
        _check(self.mm_hashes is None or (isinstance(self.mm_hashes, tuple) and 1 <= len(self.mm_hashes)
               <= MAX_MM_HASHES and all(isinstance(h, str) and _SHA256_HEX.match(h) for h in self.mm_hashes)),
               "mm_hashes", self.mm_hashes, f"must be None or 1 to {MAX_MM_HASHES} lowercase sha256 hex digests (64 "
               "characters each), as the prefill engine returned them")
        _check(self.mm_hashes is None or self.do_remote_prefill, "mm_hashes", self.mm_hashes,
               "is set only with do_remote_prefill (the prefill engine's output names its images' hashes)")
        if not self.do_remote_prefill:
            return
        _check(is_host(self.remote_host), "remote_host", self.remote_host,
               "must be the prefill engine's host name (RFC 1123) or IP address with do_remote_prefill")
        _check(_is_int(self.remote_port) and 1 <= self.remote_port <= 65536 - self.remote_ranks, "remote_port",
               self.remote_port, f"must be an integer in [1, {65536 - self.remote_ranks}] with do_remote_prefill "
               f"(remote_ranks={self.remote_ranks} ports from it)")
        _check(self.remote_request_id is None or (isinstance(self.remote_request_id, str) and
               0 < len(self.remote_request_id) <= 1024), "remote_request_id", self.remote_request_id,
               "must be None or the prefill request's id (a non-empty string of at most 1024 characters)")
        _check(is_kv_token(self.remote_kv_token), "remote_kv_token", self.remote_kv_token,
               "must be the capability the prefill engine returned in its kv_transfer_params (22 to 128 URL-safe "
               "characters) with do_remote_prefill")

    @classmethod
    def from_dict(cls, d: dict) -> "KVTransferParams":
        """From vLLM's JSON shape ({"do_remote_prefill": true, "remote_host": ..., ...}). vLLM's NixlConnector keys
        moelink has no use for (`VLLM_IGNORED_KEYS`: block ids, the engine id, the tensor-parallel size) are
        accepted and ignored, so a router written for vLLM can send its usual object (e.g. {"do_remote_decode":
        true, "remote_block_ids": null, ...}); any other key is refused. A null value means the default."""
        if not isinstance(d, dict):
            raise ValueError(f"kv_transfer_params={shown(d)} is invalid: must be an object (a dict).")
        names = [f.name for f in fields(cls) if f.name not in _INTERNAL]
        unknown = sorted(set(d) - set(names) - VLLM_IGNORED_KEYS)
        if unknown:
            raise ValueError(f"kv_transfer_params has unknown keys {shown(unknown)}: allowed are {', '.join(names)} "
                             f"(and vLLM's {', '.join(sorted(VLLM_IGNORED_KEYS))}, ignored).")
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_dict(self) -> dict:
        """vLLM's JSON shape, the fields that are set (what a prefill engine's output hands the router)."""
        out = {}
        for f in fields(self):
            if f.name in _INTERNAL:
                continue
            v = getattr(self, f.name)
            if v is not None and v != f.default:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        if self.do_remote_prefill:
            out["remote_ranks"] = self.remote_ranks  # always said: the decode side asks ports port + [0, ranks)
        return out


# vLLM NixlConnector keys a vLLM-style router may send that moelink does not need: the prefill side copies the saved
# blocks to host memory (no block ids to read remotely), engines are paired by address, and both sides' layouts
# are checked against each other before any byte moves (engine/kv_transfer/wire.py) instead of by a TP size.
_INTERNAL = frozenset({"by_role_default"})  # fields no JSON object sets or shows

VLLM_IGNORED_KEYS = frozenset({"remote_engine_id", "remote_block_ids", "tp_size", "remote_num_tokens"})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"KVTransferParams.{name}={shown(value)} is invalid: {allowed}.")


__all__ = ["KVTransferParams", "MAX_MM_HASHES", "VLLM_IGNORED_KEYS", "is_host", "is_kv_token"]
