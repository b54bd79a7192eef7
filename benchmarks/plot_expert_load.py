"""Plot expert load from `moelink stats` JSON: a layers × experts heat map and per-rank imbalance.

    moelink stats --target 127.0.0.1:50051 --out load.json
    python -m moelink.benchmarks.plot_expert_load load.json --out benchmarks/results/expert_load

Writes OUT_heatmap.png (share of each layer's routed pairs per expert; an even
router gives 1/E everywhere) and OUT_ranks.png (per MoE layer, each rank's
load over the mean — what expert parallelism waits on: the busiest rank sets
the step time). Replicated experts split their load evenly over their copies.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def rank_loads(load: dict) -> list[list[float]]:
    """[layer][rank] routed pairs each rank serves, replicas sharing their expert's load evenly."""
    copies: dict[int, int] = {}
    for held in load["experts_on_ranks"]:
        for e in held:
            copies[e] = copies.get(e, 0) + 1
    return [[sum(row[e] / copies[e] for e in held) for held in load["experts_on_ranks"]]
            for row in load["tokens_per_expert"]]


def plot(load: dict, out_prefix: str) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts_LG = np.asarray(load["tokens_per_expert"], dtype=float)
    if counts_LG.size == 0 or counts_LG.sum() == 0:
        raise ValueError("the load file has no routed tokens yet: send some requests before `moelink stats`.")
    share_LG = counts_LG / np.maximum(counts_LG.sum(axis=1, keepdims=True), 1)
    layers = load["moe_layers"]
    L, G = counts_LG.shape
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * G + 2), max(3, 0.4 * L + 1.5)))
    im = ax.imshow(share_LG * G, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    ax.set_yticks(range(L), [str(x) for x in layers])
    ax.set_title(f"Expert load (share × {G}; 1 = even), {int(counts_LG.sum())} routed pairs, top-{load['top_k']}")
    fig.colorbar(im, ax=ax, label="load / mean")
    fig.tight_layout()
    heat = Path(f"{out_prefix}_heatmap.png")
    heat.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(heat, dpi=120)
    plt.close(fig)

    per_rank_LR = np.asarray(rank_loads(load))
    R = per_rank_LR.shape[1]
    ratio_LR = per_rank_LR / np.maximum(per_rank_LR.mean(axis=1, keepdims=True), 1e-9)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * L + 2), 3.5))
    width = 0.8 / R
    for r in range(R):
        ax.bar(np.arange(L) + r * width, ratio_LR[:, r], width=width, label=f"rank {r}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(L) + 0.4 - width / 2, [str(x) for x in layers])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("rank load / mean")
    ax.set_title(f"Per-rank load, EP {R} (max/mean: {ratio_LR.max(axis=1).mean():.2f} averaged over layers)")
    if R <= 8:
        ax.legend(fontsize=7, ncol=min(R, 4))
    fig.tight_layout()
    ranks = Path(f"{out_prefix}_ranks.png")
    fig.savefig(ranks, dpi=120)
    plt.close(fig)
    return heat, ranks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("load_json", help="output of `moelink stats --out`")
    ap.add_argument("--out", default="expert_load", help="prefix of the PNG files")
    ns = ap.parse_args(argv)
    heat, ranks = plot(json.loads(Path(ns.load_json).read_text()), ns.out)
    print(f"wrote {heat} and {ranks}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
