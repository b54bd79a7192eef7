"""The KV offload tier in the cluster model (issue 47): how much of a workload's reused prompt prefixes the device
prefix cache, pinned host memory and local disk each hold per GPU, and what a hit in each saves in
time-to-first-token against recomputing the prefix.

Workload (`OffloadWorkload`): each prompt starts with one of `distinct_prefixes` shared prefixes of
`prefix_reuse` x input_len tokens (a system prompt, an agent's tools, a chat history), drawn uniformly; the rest
of the prompt is new. Tiers, per GPU: each DP-attention rank has its own prefix cache and its own tiers, as each
rank of a moelink engine does (engine/kv_transfer/offload.py), and a router sends a prefix to the rank that holds it.

    device  the HBM the weights and the running batch's KV leave (step_model.kv_budget_bytes)
    host    `host_bytes` of pinned host memory, what the device prefix cache evicted (engine/kv_transfer/offload.py),
            loaded back over the GPU's host link (kv_handoff.HOST_LINK_GBPS: PCIe 5.0 x16 on HGX, NVLink-C2C on
            Grace Blackwell)
    disk    `disk_bytes` of local NVMe, what the host tier pushed out; read at `disk_gbps` per GPU (assumed: one
            NVMe drive's sequential read per GPU, 8 drives on an HGX node) and then copied in over the host link

Where a reused prefix is found: with uniform reuse over W = distinct_prefixes x prefix tokens and LRU tiers, a
tier holding C of those tokens has a prefix with probability min(1, C / W) (the independent-reference
approximation of LRU). Each tier holds what the one above pushed out, so their room adds up:
P(device) = min(1, D/W), P(device or host) = min(1, (D + H)/W), P(found) = min(1, (D + H + K)/W).

What a prefix of P tokens costs (bytes = P x the KV bytes per token of every layer):

    recompute  = its prefill on one rank at the plan's chunk (step_model.prefill_chunk: the prefill FLOPs and
                 weight reads of P tokens, computed by the caller, planner/plan.py)
    host load  = bytes / host link
    disk load  = bytes / min(disk rate, host link)        (read, then copied in; the two overlap block by block)
    TTFT saved = recompute - load                           (a tier slower than recomputing saves nothing: the
                                                             request recomputes; said in `worth_loading`)

A device hit saves the whole recompute at no load. Per request, the saves are weighted by where its prefix is
found (`mean_ttft_saved_s`, over every request, reuse or not). Predictions, not measurements: the engine's
measured host-tier TTFT is benchmarks/kv_offload_ttft.py's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DISK_GBPS_PER_GPU = 5.0  # assumed: one PCIe 4.0 NVMe drive's sequential read (~5-7 GB/s) per GPU


@dataclass(frozen=True)
class OffloadWorkload:
    """The offload tiers per GPU (bytes; 0: none) and the workload's prefix reuse (module docstring)."""

    host_bytes: int = 0
    disk_bytes: int = 0
    prefix_reuse: float = 0.0  # fraction of each prompt that is a shared prefix
    distinct_prefixes: int = 1  # shared prefixes in circulation (the working set)
    disk_gbps: float = DISK_GBPS_PER_GPU  # disk read rate per GPU, GB/s

    def __post_init__(self) -> None:
        for name in ("host_bytes", "disk_bytes", "distinct_prefixes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "distinct_prefixes" else 0):
                floor = 1 if name == "distinct_prefixes" else 0
                raise ValueError(f"{name}={v!r} must be an integer >= {floor}.")
        if not 0 <= self.prefix_reuse < 1:
            raise ValueError(f"prefix_reuse={self.prefix_reuse!r} must be in [0, 1): the fraction of each prompt "
                             "that is a shared prefix (at least its last token is new).")
        if not self.disk_gbps > 0:
            raise ValueError(f"disk_gbps={self.disk_gbps!r} must be > 0 (GB/s per GPU).")

    @property
    def on(self) -> bool:
        """Whether the plan prices the tiers at all (a tier or some reuse asked for)."""
        return bool(self.host_bytes or self.disk_bytes or self.prefix_reuse)

    def prefix_tokens(self, input_len: int) -> int:
        return min(int(round(input_len * self.prefix_reuse)), input_len - 1)


@dataclass(frozen=True)
class TierRow:
    """One tier of the offload plan."""

    tier: str
    capacity_bytes: float
    prefix_tokens_held: float  # tokens of reused prefixes it can hold
    hit_share: float  # of the requests, those whose prefix is found here first
    load_s: float  # loading one prefix from it (0 on the device)
    ttft_saved_s: float  # per hit: recompute - load, or 0 where loading is slower

    def to_dict(self) -> dict:
        return {"tier": self.tier, "capacity_bytes": self.capacity_bytes, "prefix_tokens_held": self.prefix_tokens_held,
                "hit_share": self.hit_share, "load_ms": self.load_s * 1e3, "ttft_saved_ms": self.ttft_saved_s * 1e3,
                "worth_loading": self.ttft_saved_s > 0}


def tier_plan(w: OffloadWorkload, prefix_tokens: int, kv_bytes_per_token: float, device_bytes: float,
              host_link_gbps: float, recompute_s: float) -> dict:
    """The offload tiers for a prefix of `prefix_tokens` (module docstring). `kv_bytes_per_token`: one token's KV
    over every layer on one GPU; `device_bytes`: HBM left for cached prefixes beside the running batch;
    `recompute_s`: prefilling the prefix on one rank."""
    if kv_bytes_per_token <= 0 or host_link_gbps <= 0 or recompute_s < 0 or prefix_tokens < 0:
        raise ValueError(f"kv_bytes_per_token={kv_bytes_per_token}, host_link_gbps={host_link_gbps}, "
                         f"recompute_s={recompute_s} and prefix_tokens={prefix_tokens} must be positive.")
    nbytes = prefix_tokens * kv_bytes_per_token
    held = {"device": max(device_bytes, 0.0) / kv_bytes_per_token, "host": w.host_bytes / kv_bytes_per_token,
            "disk": w.disk_bytes / kv_bytes_per_token}
    working = w.distinct_prefixes * prefix_tokens

    def found(tokens: float) -> float:
        return 1.0 if working == 0 else min(1.0, tokens / working)

    reach = {"device": found(held["device"]), "host": found(held["device"] + held["host"]),
             "disk": found(held["device"] + held["host"] + held["disk"])}
    load = {"device": 0.0, "host": nbytes / (host_link_gbps * 1e9),
            "disk": nbytes / (min(w.disk_gbps, host_link_gbps) * 1e9)}
    rows, above = [], 0.0
    for tier in ("device", "host", "disk"):
        share = max(reach[tier] - above, 0.0) * (w.prefix_reuse > 0)
        above = max(above, reach[tier])
        cap = max(device_bytes, 0.0) if tier == "device" else getattr(w, f"{tier}_bytes")
        rows.append(TierRow(tier, cap, held[tier], share, load[tier], max(recompute_s - load[tier], 0.0)))
    found_share = sum(r.hit_share for r in rows)
    return {"prefix_tokens": prefix_tokens, "prefix_bytes": nbytes, "working_set_tokens": working,
            "distinct_prefixes": w.distinct_prefixes, "recompute_ms": recompute_s * 1e3,
            "host_link_gbps": host_link_gbps, "disk_gbps": w.disk_gbps,
            "tiers": [r.to_dict() for r in rows], "recomputed_share": 1.0 - found_share,
            "mean_ttft_saved_ms": sum(r.hit_share * r.ttft_saved_s for r in rows) * 1e3,
            "offload_ttft_saved_ms": sum(r.hit_share * r.ttft_saved_s for r in rows if r.tier != "device") * 1e3}


def chunks(tokens: int, chunk: int) -> int:
    """Prefill forwards a prompt of `tokens` takes at `chunk` tokens per forward."""
    return max(1, math.ceil(tokens / chunk))


def format_offload(res: dict) -> list[str]:
    """`moelink plan`'s lines for the offload tiers (none when the plan has no offload section)."""
    o = res.get("kv_offload")
    if not o:
        return []
    lines = [f"KV offload: a reused prefix of {o['prefix_tokens']:,} tokens ({o['prefix_bytes'] / 2**20:,.1f} MiB), "
             f"{o['distinct_prefixes']:,} in circulation ({o['working_set_tokens']:,} tokens); recomputing one: "
             f"{o['recompute_ms']:,.1f} ms on one rank",
             "  tier   | prefix tokens held | requests found here | load ms | TTFT saved per hit ms"]
    for t in o["tiers"]:
        saved = f"{t['ttft_saved_ms']:,.1f}" if t["worth_loading"] else "0 (recomputing is faster)"
        lines.append(f"  {t['tier']:<6} | {t['prefix_tokens_held']:>18,.0f} | {t['hit_share']:>19.1%} | "
                     f"{t['load_ms']:>7.2f} | {saved}")
    lines.append(f"  recomputed: {o['recomputed_share']:.1%} of requests; mean TTFT saved per request "
                 f"{o['mean_ttft_saved_ms']:,.1f} ms, {o['offload_ttft_saved_ms']:,.1f} ms of it by the host and "
                 f"disk tiers (host link {o['host_link_gbps']:g} GB/s, disk {o['disk_gbps']:g} GB/s per GPU)")
    if "prompt_tokens_cached_share" in o:
        lines.append(f"  prompt tokens not recomputed: {o['prompt_tokens_cached_share']:.1%} (--prefix-hit "
                     f"{o['prompt_tokens_cached_share']:.2f} prices it in prefill GPU-seconds and dollars)")
    return lines


def add_offload_args(p) -> None:
    """`moelink plan`'s offload flags (engine/api/plan_cli.py adds them to its parser)."""
    g = p.add_argument_group("KV offload tier (per GPU; predictions)")
    g.add_argument("--kv-offload-host-bytes", type=int, default=0,
                   help="pinned host memory per GPU for prompt KV the device prefix cache evicted (0: none)")
    g.add_argument("--kv-offload-disk-bytes", type=int, default=0,
                   help="local disk per GPU below the host tier (0: none)")
    g.add_argument("--kv-offload-disk-gbps", type=float, default=DISK_GBPS_PER_GPU,
                   help="disk read rate per GPU in GB/s (assumed: one NVMe drive's)")
    g.add_argument("--prefix-reuse", type=float, default=0.0,
                   help="fraction of each prompt that is a prefix shared with other requests, [0, 1)")
    g.add_argument("--distinct-prefixes", type=int, default=1,
                   help="shared prefixes in circulation, drawn uniformly (the working set the tiers hold)")


def offload_from_args(ns) -> OffloadWorkload:
    """The `add_offload_args` flags as an OffloadWorkload; ValueError names the flag."""
    try:
        return OffloadWorkload(host_bytes=ns.kv_offload_host_bytes, disk_bytes=ns.kv_offload_disk_bytes,
                               prefix_reuse=ns.prefix_reuse, distinct_prefixes=ns.distinct_prefixes,
                               disk_gbps=ns.kv_offload_disk_gbps)
    except ValueError as exc:
        field = str(exc).split("=", 1)[0]
        flag = {"host_bytes": "--kv-offload-host-bytes", "disk_bytes": "--kv-offload-disk-bytes",
                "disk_gbps": "--kv-offload-disk-gbps"}.get(field, "--" + field.replace("_", "-"))
        raise ValueError(f"{flag}: {exc}") from None


__all__ = ["DISK_GBPS_PER_GPU", "OffloadWorkload", "TierRow", "add_offload_args", "chunks", "format_offload",
           "offload_from_args", "tier_plan"]
