"""How much of a sorted MoE GEMM's work is padding, counted without a GPU: the bound BLOCK_M puts on the fraction of
the matmul ceiling a shape can reach at large batches (issue 80's >= 70 % at >= 4,096 tokens).

    python -m moelink.benchmarks.moe_padding [--out benchmarks/results/moe_padding.json]

The sorted path pads each expert's rows to a multiple of BLOCK_M (kernels/moe_align.py), and every padded row costs
the tensor cores what a real one does. Under uniform routing an expert's rows are Binomial(T*K, 1/E) (K distinct
experts a token: close to it at E >= 8), so the useful fraction at a BLOCK_M is E[n] / E[ceil(n / BM) * BM],
computed exactly from the binomial's probabilities. A config whose useful fraction is below 0.70 cannot meet the
goal whatever its kernel does; the table says which BLOCK_M each shape's tuned table picks (H100) beside it.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .compile_cases import MODEL_SHAPES, TARGET_NAME

RESULTS = Path(__file__).parent / "results"
TOKENS = (1024, 4096, 16384)
BLOCK_MS = (16, 32, 64, 128, 256)


def binomial_pmf(n: int, p: float):
    """(k, P(k)) of Binomial(n, p) over the k that carry the mass (mean +- 12 sd), from log-gamma: exact to
    rounding, no scipy."""
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    lo, hi = max(0, int(mean - 12 * sd) - 1), min(n, int(mean + 12 * sd) + 2)
    log_c = math.lgamma(n + 1)
    for k in range(lo, hi + 1):
        yield k, math.exp(log_c - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
                          + (n - k) * math.log1p(-p))


def useful_fraction(tokens: int, top_k: int, experts: int, block_m: int) -> float:
    """E[rows] / E[padded rows] of one expert's GEMM rows at this BLOCK_M (all experts alike under uniform routing)."""
    pairs = tokens * top_k
    padded = sum(prob * -(-k // block_m) * block_m for k, prob in binomial_pmf(pairs, 1 / experts))
    return pairs / experts / padded if padded else 1.0


def tuned_block_m(shape: tuple[int, int, int, int], tokens: int) -> int:
    """BLOCK_M of the config the H100's table (else default.json) picks for this call."""
    from moelink.kernels.moe_config import lookup_moe_config

    E, K, D, I = shape
    return lookup_moe_config(E, I, tokens, K, TARGET_NAME).BLOCK_SIZE_M


def table() -> list[dict]:
    rows = []
    for name, shape in MODEL_SHAPES.items():
        E, K, _, _ = shape
        for T in TOKENS:
            picked = tuned_block_m(shape, T)
            fracs = {bm: round(useful_fraction(T, K, E, bm), 4) for bm in BLOCK_MS}
            rows.append(dict(shape=name, tokens=T, rows_per_expert=T * K / E, useful_fraction=fracs,
                             tuned_block_m=picked, tuned_useful_fraction=fracs.get(picked)))
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "moe_padding.json"), help="JSON path")
    args = ap.parse_args(argv)
    rows = table()
    print("| shape | tokens | rows / expert | " + " | ".join(f"BM {bm}" for bm in BLOCK_MS) + " | H100 table's BM |")
    print("|---|---:|---:|" + "---:|" * len(BLOCK_MS) + "---:|")
    for r in rows:
        cells = " | ".join(f"{r['useful_fraction'][bm]:.2f}" for bm in BLOCK_MS)
        print(f"| {r['shape']} | {r['tokens']:,} | {r['rows_per_expert']:.0f} | {cells} | {r['tuned_block_m']} |")
    Path(args.out).write_text(json.dumps(dict(benchmark="moe_padding", routing="uniform, Binomial(T*K, 1/E) rows an "
                                              "expert", rows=rows), indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
