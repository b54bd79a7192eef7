"""The KV handoff of disaggregated serving: what moving a request's prompt KV from its prefill GPU to its decode GPU
costs, with moelink's transports as measured.

    bytes  = input_len x layers x KV bytes per token and layer   (the whole prompt: the decode side loads it all)
    save   = bytes / device-to-host bandwidth    (prefill GPU: the blocks gathered and copied to pinned host memory
                                                  on a side stream, engine/contract/kv_blocks.py read_async)
    wire   = latency + bytes / transport rate    (moelink's tcp transport as benchmarked, or the link it runs on if
                                                  that is slower)
    load   = bytes / host-to-device bandwidth    (decode GPU: each layer written into the request's reserved blocks
                                                  as it arrives, engine/kv_transfer/arrival.py)
    TTFT added = save + max(wire, load) + one layer's load   (the load is pipelined with the wire, layer by layer)

What is measured and what is assumed: the transport rate comes from benchmarks/kv_transfer.py's JSON
(benchmarks/results/kv_transfer_cpu.json: one load over loopback on the CPU machine, each layer written into
cache blocks as it arrives; its GB/s is what moelink's host-staged tcp path sustains per fetch thread, which a
GPU node does not change, since the bytes cross the host there too). The host link is assumed: PCIe 5.0 x16 (about
50 GB/s each way in practice) on HGX nodes, NVLink-C2C to the Grace CPU (450 GB/s each way) on GB200/GB300.
`at_link_ms` is what a device-to-device transport (NIXL over RDMA, or NCCL with the saved KV kept on the device:
not built yet) would take at the inter-pool link's efficiency, for comparison.

GPU time: the copies run on the copy engines from side streams, beside the steps, so they hold no SM time; what
does is the gather (save) and the scatter (load) of the request's block rows, a read and a write of the bytes in
HBM on each side (`gather_s`), which is what the handoff adds to each pool's GPU-seconds per request. The wire
and the copies add to time-to-first-token, and the decode side's blocks are reserved meanwhile.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

MEASURED_JSON = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "kv_transfer_cpu.json"
HOST_LINK_GBPS = {  # per GPU, each way, achievable: PCIe 5.0 x16 on HGX, NVLink-C2C on Grace Blackwell
    "H100-SXM": 50.0, "H200": 50.0, "H800": 50.0, "B200": 50.0, "B300": 50.0, "GB200": 450.0, "GB300": 450.0}
TRANSPORT_LATENCY_S = 1e-3  # connect, header, layout check: measured well under 1 ms on loopback; rounded up


@dataclass(frozen=True)
class HandoffCost:
    bytes_per_request: float
    save_s: float  # prefill GPU, device to host (copy engine, side stream)
    wire_s: float  # moelink's transport, as measured
    load_s: float  # decode GPU, host to device (copy engine, pipelined with the wire layer by layer)
    gather_s: float  # each side's SM time: the block rows gathered (save) or scattered (load) in HBM
    num_layers: int
    at_link_s: float  # a device-to-device transport at the inter-pool link's efficiency (not built)
    transport_gbps: float
    transport_source: str
    link: str

    @property
    def ttft_s(self) -> float:
        """What the handoff adds to time-to-first-token: the save, then the wire with each layer's load behind it
        (the last layer's load after the wire ends)."""
        return self.save_s + max(self.wire_s, self.load_s) + self.load_s / self.num_layers

    def to_dict(self) -> dict:
        return {"bytes_per_request": self.bytes_per_request, "save_ms": self.save_s * 1e3, "wire_ms": self.wire_s * 1e3,
                "load_ms": self.load_s * 1e3, "gpu_gather_ms": self.gather_s * 1e3, "ttft_added_ms": self.ttft_s * 1e3,
                "device_to_device_at_link_ms": self.at_link_s * 1e3, "transport_gbps": self.transport_gbps,
                "transport_source": self.transport_source, "link": self.link}


def measured_transport_gbps(path: Path = MEASURED_JSON, transport: str = "tcp") -> tuple[float, str]:
    """(GB/s, where it comes from): the median of the benchmark's rows for `transport`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"no KV transfer measurement at {path} ({exc}): run "
                         f"`python -m moelink.benchmarks.kv_transfer --json {path}`.") from None
    rows = [r for r in data.get("rows", []) if r.get("transport") == transport]
    if not rows:
        raise ValueError(f"{path} has no rows for transport {transport!r}.")
    gbps = statistics.median(r["transport_gbps"] for r in rows)
    return gbps, (f"moelink {transport} transport, median of {len(rows)} fetches "
                  f"({Path(path).name}, {data.get('device', '?')}, {data.get('date', '?')})")


def handoff_cost(kv_bytes_per_token: float, input_len: int, hw, measured: tuple[float, str] | None = None,
                 num_layers: int = 1) -> HandoffCost:
    """The handoff of one request of `input_len` prompt tokens on hardware profile `hw` (planner/hardware.py);
    `num_layers`: the KV's layers, the units the load is pipelined in."""
    if kv_bytes_per_token <= 0 or input_len < 1 or num_layers < 1:
        raise ValueError(f"kv_bytes_per_token={kv_bytes_per_token}, input_len={input_len} and "
                         f"num_layers={num_layers} must be positive.")
    gbps, source = measured if measured is not None else measured_transport_gbps()
    nbytes = kv_bytes_per_token * input_len
    host = HOST_LINK_GBPS[hw.gpu.name] * 1e9
    # Pools in one NVLink domain (NVL72) hand off over NVLink; HGX pools are on different nodes: the NIC.
    link = hw.fabric.intra if hw.fabric.domain_size >= 16 else hw.fabric.inter
    link_bps = link.bw_gbps * 1e9 * link.efficiency
    wire = TRANSPORT_LATENCY_S + nbytes / min(gbps * 1e9, link_bps)
    return HandoffCost(bytes_per_request=nbytes, save_s=nbytes / host, wire_s=wire, load_s=nbytes / host,
                       gather_s=2 * nbytes / hw.gpu.ceiling_hbm_bytes_per_s, num_layers=num_layers,
                       at_link_s=link.latency_s + nbytes / link_bps, transport_gbps=gbps, transport_source=source,
                       link=link.name)


__all__ = ["HandoffCost", "handoff_cost", "measured_transport_gbps", "HOST_LINK_GBPS"]
