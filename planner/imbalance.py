"""Expert-load imbalance: max over mean of the (token, expert) pairs a rank receives.

The busiest EP rank sets the pace of every MoE layer (its grouped GEMM is the
longest and the combine ends when it has sent everything), so step time scales
with max/mean, not with the mean.

A rank holding e expert slots receives the sum of their loads. Its coefficient
of variation (cv) over one micro-batch has three independent parts:
- static skew: long-run expert popularity with per-expert cv `c`, c^2/e. EPLB
  removes it (it replicates hot experts and packs slots so that long-run rank
  loads are equal); `EPLB_STATIC_CV` is what its statistics window leaves.
- sequence clustering: each sequence routes by its own topic, so an expert's
  share of a batch depends on which sequences are in it. With per-sequence cv
  `tau` of an expert's share (`SEQUENCE_CV`) and S sequences pooled by the EP
  group (every rank's), one expert's load has cv tau/sqrt(S) and the rank's
  tau^2/(S e). S = ep * seqs_per_rank and e = slots/ep, so S e = seqs_per_rank
  * slots: this part does not grow with EP. A wider group pools more sequences
  into every expert, which offsets holding fewer experts per rank. It shrinks
  with the sequences per rank (decode: the batch; prefill: chunk / prompt, a
  few long prompts), which is why prefill is far less balanced than decode.
- sampling noise: a rank expecting mu pairs sees Poisson noise, 1/mu.
The expected maximum of R ranks is mean * (1 + cv_rank * z_R), z_R the expected
maximum of R independent standard normals (numerically integrated; 1.42 for 8,
2.07 for 32, 2.40 for 72). Only z_R and the static residual grow with EP.

`Balance` names the cases: "perfect" (profiling with forced-uniform routing:
DeepSeek's profile-data), "uniform" (random routing, noise only), "eplb"
(real traffic after DeepSeek's EPLB rebalancing), "none" (real traffic, no
rebalancing), a float (per-expert cv, i.e. a skew parameter) or measured
per-expert token counts.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

# Per-sequence cv of an expert's share of the sequence's routed pairs (real traffic: sequences cluster on
# experts by topic and language). Fitted once on one published ablation: SGLang's EP32 prefill of 4K
# prompts (LMSYS large-scale-EP blog) ran 50,302 tok/s/node with its real EPLB placement vs 59,337 with
# simulated perfect balance (0.85x); `calibration.fit_sequence_cv` gives this value and a test keeps them equal.
SEQUENCE_CV = 4.2
# Long-run per-expert cv left after EPLB. Assumed, not fitted: EPLB places from recent statistics of the
# traffic it serves, so what is left is drift since the last placement and slot granularity. 0.1-0.2 keeps
# every calibration row in band (0.1 puts DeepSeek's day-6 fleet average, high by construction, at +30.3%);
# the higher value also makes decode fall faster with EP (-12.5% vs -8% from EP 32 to 96), the side the
# -10% quoted in issue 19 lies between. A vLLM EP16 trace (vllm#50647, Kimi K3, gsm8k) measured max/mean
# 1.008 with EPLB: at small EP the residual is small either way.
EPLB_STATIC_CV = 0.2
# Without rebalancing: per-expert long-run cv. SGLang measured EPLB speed-ups of 1.49x (prefill) and
# 2.54x (decode); cv 1.0 is the round figure (a few hot experts carrying several times the mean).
# Only used when a setup says balance="none".
NO_EPLB_CV = 1.0

BALANCE_KINDS = ("perfect", "uniform", "eplb", "none")


@dataclass(frozen=True)
class Balance:
    """How evenly routed tokens land on EP ranks.

    kind: one of BALANCE_KINDS, or "skew" with `cv` (per-expert coefficient of
    variation), or "counts" with `counts` (tokens per logical expert, measured).
    sequence_cv: per-sequence cv of an expert's share for real traffic ("eplb", "none");
    None means SEQUENCE_CV.
    """

    kind: str = "eplb"
    cv: float = 0.0
    counts: tuple[float, ...] = ()
    sequence_cv: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in BALANCE_KINDS + ("skew", "counts"):
            raise ValueError(f"balance kind={self.kind!r} is not supported: choose from "
                             f"{', '.join(BALANCE_KINDS)}, 'skew' (with cv) or 'counts'.")
        if self.kind == "skew" and self.cv < 0:
            raise ValueError(f"balance cv={self.cv} must be >= 0.")
        if self.sequence_cv is not None and self.sequence_cv < 0:
            raise ValueError(f"balance sequence_cv={self.sequence_cv} must be >= 0.")
        if self.kind == "counts" and (not self.counts or min(self.counts) < 0 or sum(self.counts) <= 0):
            raise ValueError("balance counts must be non-empty, non-negative and not all zero.")

    @classmethod
    def parse(cls, value: "str | float | Balance") -> "Balance":
        """'eplb' / 'none' / 'uniform' / 'perfect' / a number (skew cv) / a Balance."""
        if isinstance(value, Balance):
            return value
        if isinstance(value, (int, float)):
            return cls("skew", cv=float(value))
        try:
            return cls("skew", cv=float(value))
        except ValueError:
            return cls(str(value))

    def systematic_cv(self) -> float:
        return {"perfect": 0.0, "uniform": 0.0, "eplb": EPLB_STATIC_CV, "none": NO_EPLB_CV,
                "skew": self.cv}.get(self.kind, 0.0)

    def real_traffic(self) -> bool:
        """Real requests (their sequences cluster on experts), as opposed to synthetic or measured routing."""
        return self.kind in ("eplb", "none")


@functools.lru_cache(maxsize=None)
def expected_max_normal(ranks: int) -> float:
    """E[max of `ranks` iid N(0,1)] = integral of x * R * phi(x) * Phi(x)^(R-1) dx (0 for one rank)."""
    if ranks <= 1:
        return 0.0
    step, total = 1e-3, 0.0
    for i in range(-8000, 8001):
        x = i * step
        phi = math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1.0 + math.erf(x / math.sqrt(2)))
        total += x * ranks * phi * cdf ** (ranks - 1) * step
    return total


def counts_imbalance(counts: list[float] | tuple[float, ...], ep: int) -> float:
    """max/mean of per-rank loads with logical experts placed contiguously (expert i on rank i*ep//n).

    When ep does not divide the expert count, ranks hold floor or ceil of n/ep experts.
    """
    n = len(counts)
    if not 1 <= ep <= n:
        raise ValueError(f"ep={ep} must be in [1, number of counted experts ({n})].")
    loads = [0.0] * ep
    for i, c in enumerate(counts):
        loads[i * ep // n] += c
    mean = sum(loads) / ep
    return max(loads) / mean if mean > 0 else 1.0


def expert_load_imbalance(balance: Balance, ep: int, experts_per_rank: float, pairs_per_rank: float,
                          seqs_per_rank: float | None = None) -> float:
    """Expected max/mean pairs per rank for one MoE layer (>= 1).

    seqs_per_rank: sequences whose tokens make up a rank's pairs (needed for real traffic, "eplb" and
    "none": the sequence-clustering term)."""
    if ep <= 1:
        return 1.0
    if balance.kind == "perfect":
        return 1.0
    if balance.kind == "counts":
        return counts_imbalance(balance.counts, ep)
    e = max(experts_per_rank, 1e-9)
    var = balance.systematic_cv() ** 2 / e + 1.0 / max(pairs_per_rank, 1e-9)
    if balance.real_traffic():
        if seqs_per_rank is None or seqs_per_rank <= 0:
            raise ValueError(f"balance {balance.kind!r} needs seqs_per_rank > 0 (got {seqs_per_rank}).")
        tau = SEQUENCE_CV if balance.sequence_cv is None else balance.sequence_cv
        var += tau ** 2 / (seqs_per_rank * ep * e)
    return 1.0 + math.sqrt(var) * expected_max_normal(ep)


def zipf_counts(num_experts: int, exponent: float, total: float = 1e6) -> tuple[float, ...]:
    """Token counts per expert following Zipf(exponent), shuffled deterministically across experts.

    A convenience for "what if routing were this skewed": feed the result to Balance('counts', counts=...).
    """
    if exponent < 0:
        raise ValueError(f"zipf exponent={exponent} must be >= 0.")
    weights = [1.0 / (i + 1) ** exponent for i in range(num_experts)]
    norm = sum(weights)
    # Spread ranks over placement slots with a fixed stride so hot experts do not share a rank.
    stride = next(s for s in range(num_experts // 2 + 1, num_experts + 1) if math.gcd(s, num_experts) == 1) \
        if num_experts > 2 else 1
    out = [0.0] * num_experts
    for i, w in enumerate(weights):
        out[(i * stride) % num_experts] = total * w / norm
    return tuple(out)
