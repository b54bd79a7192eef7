"""Bandwidth/latency models of GPU links and of the EP all-to-all that runs over them.

Standard library only (no torch, no model code): the cluster model in
`moelink.planner` predicts dispatch/combine times from these.

Units: bytes, seconds, GB/s = 1e9 bytes/s. "Per GPU per direction" everywhere:
NVLink 4 is sold as 900 GB/s *bidirectional*, i.e. 450 GB/s each way.

Dispatch volume. moelink sends each token once per *distinct destination
rank* (ARCHITECTURE.md: Design rules 14), so the volume per token is (expected distinct ranks) x
payload, not top-k x payload. Other systems we calibrate against send
differently; `Pattern` names each:

- RANK:      once per distinct destination rank (moelink; DeepEP normal intranode).
- EXPERT:    once per (token, expert) pair (DeepEP low-latency, pplx).
- NODE:      once per distinct remote *node* over the NIC, then NVLink fan-out
             inside the node (DeepEP normal internode).
- ALLGATHER: every token to every rank, reduce-scatter back (TensorRT-LLM
             attention-DP + EP8 with FP4 all-gather).

Expected distinct ranks (`expected_distinct_ranks`) is exact for uniform
routing (hypergeometric), including DeepSeek's group-limited routing with
contiguous expert placement; for skewed routing it uses a documented
successive-sampling approximation (tests check it against Monte Carlo).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .ep_modes import EXACT, dispatch_wire_bytes

GB = 1e9


@dataclass(frozen=True)
class LinkSpec:
    """One kind of link, as seen by one GPU.

    bw_gbps: peak bandwidth per GPU per direction (GB/s).
    latency_s: fixed cost of one collective op on this link (launch, sync, first byte).
    efficiency: fraction of bw_gbps a well-tuned all-to-all reaches on large messages.
    half_bw_bytes: message size per peer at which half the asymptotic bandwidth is reached.
    """

    name: str
    bw_gbps: float
    latency_s: float
    efficiency: float
    half_bw_bytes: float

    def __post_init__(self) -> None:
        if self.bw_gbps <= 0:
            raise ValueError(f"LinkSpec {self.name}: bw_gbps={self.bw_gbps} must be > 0.")
        if self.latency_s < 0:
            raise ValueError(f"LinkSpec {self.name}: latency_s={self.latency_s} must be >= 0.")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"LinkSpec {self.name}: efficiency={self.efficiency} must be in (0, 1].")
        if self.half_bw_bytes < 0:
            raise ValueError(f"LinkSpec {self.name}: half_bw_bytes={self.half_bw_bytes} must be >= 0.")

    def transfer_time(self, total_bytes: float, bytes_per_peer: float | None = None) -> float:
        """Seconds to move `total_bytes` out of (or into) one GPU, split into messages of `bytes_per_peer`.

        time = latency + total / (bw * efficiency * m / (m + half_bw_bytes)); the
        last factor is the usual half-bandwidth-point model of small messages.
        """
        if total_bytes <= 0:
            return 0.0
        m = total_bytes if bytes_per_peer is None else max(bytes_per_peer, 1.0)
        size_eff = m / (m + self.half_bw_bytes)
        return self.latency_s + total_bytes / (self.bw_gbps * GB * self.efficiency * size_eff)


# Link efficiencies: NCCL reaches ~370 of 450 GB/s on H100 NVLink (nccl-tests #212) = 0.82;
# DeepEP low-latency reaches 39-46 GB/s of a 50 GB/s CX7 NIC at EP64-256 (DeepEP README) = 0.8-0.9.
# One value, 0.8, for all; latencies from DeepEP/pplx small-batch timings (tens of us per op over
# RDMA, a few us over NVLink).
LINK_EFFICIENCY = 0.8
NVLINK4 = LinkSpec("nvlink4", bw_gbps=450, latency_s=5e-6, efficiency=LINK_EFFICIENCY, half_bw_bytes=32e3)
# H800: NVLink cut to 400 GB/s bidirectional (DeepSeek-V3 report; DeepEP measures ~160 GB/s).
NVLINK_H800 = LinkSpec("nvlink-h800", bw_gbps=200, latency_s=5e-6, efficiency=LINK_EFFICIENCY, half_bw_bytes=32e3)
NVLINK5 = LinkSpec("nvlink5", bw_gbps=900, latency_s=5e-6, efficiency=LINK_EFFICIENCY, half_bw_bytes=64e3)
IB_NDR400 = LinkSpec("ib-ndr-400", bw_gbps=50, latency_s=15e-6, efficiency=LINK_EFFICIENCY, half_bw_bytes=4e3)
# RoCE v2 at 400 Gb/s: same wire rate, higher tail latency under congestion control.
ROCE400 = LinkSpec("roce-400", bw_gbps=50, latency_s=25e-6, efficiency=LINK_EFFICIENCY * 0.9, half_bw_bytes=4e3)
LINKS = {link.name: link for link in (NVLINK4, NVLINK_H800, NVLINK5, IB_NDR400, ROCE400)}


@dataclass(frozen=True)
class Fabric:
    """How the GPUs of an EP group are wired: an NVLink domain of `domain_size` GPUs, NICs between domains."""

    intra: LinkSpec
    inter: LinkSpec
    domain_size: int

    def __post_init__(self) -> None:
        if self.domain_size < 1:
            raise ValueError(f"Fabric domain_size={self.domain_size} must be >= 1.")


class Pattern(str, enum.Enum):
    """Which copies of a token cross the wire (see module docstring)."""

    RANK = "rank"
    EXPERT = "expert"
    NODE = "node"
    ALLGATHER = "allgather"


PAYLOAD_DTYPES = ("bf16", "fp8", "nvfp4")


def payload_bytes(hidden: int, dtype: str) -> float:
    """Bytes of one token's hidden vector on the wire, scales included.

    bf16: 2 B/element. fp8: 1 B/element + one fp32 scale per 128 elements
    (DeepSeek block scaling). nvfp4: 0.5 B/element + one fp8 scale per 16.
    """
    if dtype == "bf16":
        return 2.0 * hidden
    if dtype == "fp8":
        return hidden + 4.0 * math.ceil(hidden / 128)
    if dtype == "nvfp4":
        return 0.5 * hidden + math.ceil(hidden / 16)
    raise ValueError(f"payload dtype={dtype!r} is not supported: choose from {', '.join(PAYLOAD_DTYPES)}.")


def _comb(n: int, k: int) -> float:
    return float(math.comb(n, k)) if 0 <= k <= n else 0.0


def _p_none_uniform(pool: int, on_rank: int, k: int) -> float:
    """P(none of k experts drawn without replacement from `pool` lies among `on_rank` of them)."""
    return _comb(pool - on_rank, k) / _comb(pool, k)


def expected_distinct_ranks(num_experts: int, top_k: int, num_ranks: int, *, n_group: int = 1,
                            topk_group: int = 1, expert_probs: list[float] | None = None) -> float:
    """Expected number of distinct ranks a token's top-k experts live on (contiguous placement, E/R per rank).

    Uniform routing (expert_probs None): exact. P(rank r not hit) is hypergeometric,
    C(E - e, k) / C(E, k) with e = E/R. Group-limited routing (DeepSeek-V3:
    8 groups, top-4 groups) is modelled as: pick `topk_group` of `n_group`
    groups uniformly, then k experts uniformly among the picked groups' experts;
    with contiguous placement a rank then either holds whole groups or part of one.

    Skewed routing (expert_probs, one weight per expert, summing to 1):
    successive-sampling approximation P(r not hit) = prod_j (1 - q_r * E / (E - j)),
    j = 0..k-1, q_r = mass of rank r; exact when the weights are uniform.
    """
    E, k, R = num_experts, top_k, num_ranks
    if R < 1 or E % R:
        raise ValueError(f"num_ranks={R} must divide num_experts={E}.")
    if not 1 <= k <= E:
        raise ValueError(f"top_k={k} must be in [1, num_experts={E}].")
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"n_group={n_group}, topk_group={topk_group} must satisfy 1 <= topk_group <= n_group | E.")
    e = E // R
    if expert_probs is not None:
        if len(expert_probs) != E or any(p < 0 for p in expert_probs) or abs(sum(expert_probs) - 1) > 1e-6:
            raise ValueError(f"expert_probs must have {E} non-negative weights summing to 1.")
        total = 0.0
        for r in range(R):
            q = sum(expert_probs[r * e:(r + 1) * e])
            p_none = 1.0
            for j in range(k):
                p_none *= max(0.0, 1.0 - q * E / (E - j))
            total += 1.0 - p_none
        return total
    ge = E // n_group                      # experts per group
    pool = topk_group * ge                 # experts a token may pick from
    if topk_group == n_group:              # no group limit in effect
        return R * (1.0 - _p_none_uniform(E, e, k))
    if e >= ge:                            # a rank holds h whole groups
        h = e // ge
        p_none = 0.0
        for j in range(0, min(h, topk_group) + 1):
            p_groups = _comb(h, j) * _comb(n_group - h, topk_group - j) / _comb(n_group, topk_group)
            p_none += p_groups * _p_none_uniform(pool, j * ge, k)
    else:                                  # a rank holds part of one group
        p_sel = topk_group / n_group
        p_none = (1 - p_sel) + p_sel * _p_none_uniform(pool, e, k)
    return R * (1.0 - p_none)


@dataclass(frozen=True)
class RoutingSpec:
    """Routing as the all-to-all sees it. num_experts counts physical slots (with EPLB replicas)."""

    num_experts: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1

    def distinct_ranks(self, ranks: int) -> float:
        """Expected distinct destination ranks per token, self included."""
        if self.num_experts % ranks:  # EPLB slot counts need not divide: spread fractional experts
            return ranks * (1.0 - (1.0 - 1.0 / ranks) ** self.top_k)
        return expected_distinct_ranks(self.num_experts, self.top_k, ranks, n_group=self.n_group,
                                       topk_group=self.topk_group)


@dataclass(frozen=True)
class A2ATime:
    """One dispatch + combine on one rank: seconds and bytes per link (intra = NVLink, inter = NIC)."""

    dispatch_s: float
    combine_s: float
    intra_bytes: float
    inter_bytes: float

    @property
    def total_s(self) -> float:
        return self.dispatch_s + self.combine_s


def a2a_bytes(tokens: float, routing: RoutingSpec, ep: int, domain_size: int, pattern: Pattern,
              token_bytes: float, mode: str = EXACT, capacity: float | None = None) -> tuple[float, float, int, int]:
    """Bytes one rank sends for `tokens` tokens: (intra-domain, inter-domain, intra peers, inter peers).

    Self-sends are local copies and cost no link time. Destinations are spread
    uniformly, so a fraction (G-1)/R of them share the sender's NVLink domain.
    `mode` (per-rank pattern only): the engine's dispatch mode, whose wire rows
    come from `comm.ep_modes.dispatch_wire_bytes`, the formula the engine's own
    counters measure: "exact" (rows of real tokens only), "low_latency" /
    "high_throughput" (R blocks of `capacity` rows, padding included).
    """
    g = min(domain_size, ep)
    intra_peers, inter_peers = g - 1, ep - g
    if ep == 1:
        return 0.0, 0.0, 0, 0
    pattern = Pattern(pattern)
    if pattern == Pattern.ALLGATHER:
        copies_intra, copies_inter = float(intra_peers), float(inter_peers)
    elif pattern == Pattern.EXPERT:
        copies_intra, copies_inter = routing.top_k * intra_peers / ep, routing.top_k * inter_peers / ep
    else:
        d = routing.distinct_ranks(ep)
        if mode != EXACT and tokens:
            # Fixed blocks: every peer gets `capacity` rows whatever the routing; the formula is the engine's.
            wire = dispatch_wire_bytes(mode, world_size=ep, tokens=tokens, distinct_ranks_per_token=d,
                                       row_bytes=token_bytes, capacity=capacity).wire
            d = wire / (tokens * token_bytes)
        copies_intra, copies_inter = d * intra_peers / ep, d * inter_peers / ep
        if pattern == Pattern.NODE and inter_peers:
            nodes = math.ceil(ep / g)
            node_routing = RoutingSpec(routing.num_experts, routing.top_k)
            remote_nodes = node_routing.distinct_ranks(nodes) * (nodes - 1) / nodes
            # Over the NIC once per remote node; the receiving node fans out over NVLink.
            copies_intra += copies_inter
            copies_inter = remote_nodes
    return tokens * copies_intra * token_bytes, tokens * copies_inter * token_bytes, intra_peers, inter_peers


def all_to_all_time(tokens: float, hidden: int, routing: RoutingSpec, ep: int, fabric: Fabric, *,
                    pattern: Pattern | str = Pattern.RANK, dispatch_dtype: str = "fp8",
                    combine_dtype: str = "bf16", recv_imbalance: float = 1.0, mode: str = EXACT,
                    capacity: float | None = None) -> A2ATime:
    """Time of one EP dispatch + combine for `tokens` tokens on each of `ep` ranks.

    NVLink and NIC traffic proceed concurrently, so each op takes the slower
    of the two. `recv_imbalance` (max/mean tokens received) stretches the op:
    it ends when the busiest receiver is done. `mode` / `capacity`: the engine's
    dispatch mode and its block size (see `a2a_bytes`; default exact rows).
    """
    if recv_imbalance < 1:
        raise ValueError(f"recv_imbalance={recv_imbalance} must be >= 1 (max over mean).")
    times, intra_total, inter_total = [], 0.0, 0.0
    for dtype in (dispatch_dtype, combine_dtype):
        intra, inter, n_intra, n_inter = a2a_bytes(tokens, routing, ep, fabric.domain_size, Pattern(pattern),
                                                   payload_bytes(hidden, dtype), mode, capacity)
        t_intra = fabric.intra.transfer_time(intra * recv_imbalance, intra / n_intra if n_intra else None)
        t_inter = fabric.inter.transfer_time(inter * recv_imbalance, inter / n_inter if n_inter else None)
        times.append(max(t_intra, t_inter))
        intra_total += intra
        inter_total += inter
    return A2ATime(times[0], times[1], intra_total, inter_total)
