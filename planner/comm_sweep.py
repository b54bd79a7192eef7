"""Validation of the all-to-all across EP sizes: DeepEP's published per-EP dispatch/combine latencies
against the step model's own per-layer times (`step_model._Layers.comm`). No constant is set from them;
`moelink plan --calibrate` prints the table and writes it to the JSON as `comm_sweep`."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .efficiency import DEFAULT_EFFICIENCY
from .hardware import get_profile
from .imbalance import Balance
from .models import get_model
from .step_model import Setup, _Layers, _Load

DEEPEP_LL = "deepseek-ai/DeepEP README, 'Low-latency kernels with pure RDMA' table (H800, CX7 400 Gb/s per GPU, " \
            "128 tokens per rank, hidden 7168, top-8, FP8 dispatch, BF16 combine, random routing), " \
            "https://github.com/deepseek-ai/DeepEP"


@dataclass(frozen=True)
class CommRow:
    """One published all-to-all latency of a per-EP sweep: dispatch and combine of one layer, microseconds.
    Validation only: no constant is set from it (the link model predates it)."""

    ep: int
    dispatch_us: float
    combine_us: float
    hardware: str = "h800-hgx"
    tokens: int = 128
    experts: int = 288
    source: str = DEEPEP_LL
    split: str = "validation"


# DeepEP's low-latency (decode) kernels across EP sizes. EP 8 is left out: there the README's kernels sent
# over RDMA inside one node, which no engine the model describes does.
COMM_ROWS = tuple(CommRow(ep, d, c) for ep, d, c in
                  ((16, 118, 195), (32, 155, 273), (64, 173, 314), (128, 192, 369), (256, 194, 360)))


def predict_comm(row: CommRow, model_name: str = "deepseek-v3") -> tuple[float, float]:
    """(dispatch, combine) microseconds the step model gives one layer of `row`: DeepEP's low-latency
    pattern (one copy per routed expert), random routing (Balance 'uniform'), the combine waiting for the
    busiest rank as in `step_model._Layers.comm`."""
    model = replace(get_model(model_name), num_experts=row.experts)
    setup = Setup(ep=row.ep, balance=Balance("uniform"), decode_pattern="expert")
    layers = _Layers(model, get_profile(row.hardware), setup, DEFAULT_EFFICIENCY, "expert")
    ld = _Load(rows=row.tokens, attn_flops=0.0, attn_bytes=0.0, pool=row.tokens, comm=row.tokens,
               seqs=row.tokens)
    t = layers.comm(ld, layers.imbalance(ld))
    return t["dispatch"] * 1e6, t["combine"] * 1e6


def comm_sweep() -> list[dict]:
    """COMM_ROWS with the model's prediction and relative errors (dispatch, combine, their sum)."""
    out = []
    for r in COMM_ROWS:
        d, c = predict_comm(r)
        out.append({"ep": r.ep, "split": r.split, "hardware": r.hardware, "tokens_per_rank": r.tokens,
                    "published_dispatch_us": r.dispatch_us, "published_combine_us": r.combine_us,
                    "predicted_dispatch_us": d, "predicted_combine_us": c,
                    "error_sum": (d + c) / (r.dispatch_us + r.combine_us) - 1.0, "source": r.source})
    return out


def format_comm_sweep(rows: list[dict]) -> str:
    lines = ["| EP | published dispatch / combine us | predicted | error (sum) |", "|---:|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['ep']} | {r['published_dispatch_us']:.0f} / {r['published_combine_us']:.0f} | "
                     f"{r['predicted_dispatch_us']:.0f} / {r['predicted_combine_us']:.0f} | {r['error_sum']:+.1%} |")
    return "\n".join(lines)
