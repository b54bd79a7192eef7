"""Plots of the cluster model: predicted throughput per GPU against EP size, one line per hardware."""
from __future__ import annotations

from pathlib import Path


def plot_ep_sweep(results: dict, path: str | Path, title: str) -> Path:
    """results: {hardware: plan dict (with "sweep")}. Left: decode tokens/s/GPU at the best batch meeting
    the ITL target; right: prefill tokens/s/GPU. Writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and GPU boxes have no display
    import matplotlib.pyplot as plt

    fig, (ax_d, ax_p) = plt.subplots(1, 2, figsize=(12, 4.6))
    for hw, res in results.items():
        sweep = res["sweep"]
        dec = [(r["ep"], r["decode"]["tokens_per_s_per_gpu"]) for r in sweep if r["decode"]]
        pre = [(r["ep"], r["prefill_tokens_per_s_per_gpu"]) for r in sweep if r["prefill_tokens_per_s_per_gpu"]]
        if dec:
            ax_d.plot(*zip(*dec), marker="o", label=hw)
        if pre:
            ax_p.plot(*zip(*pre), marker="o", label=hw)
    slo = next(iter(results.values()))["inputs"]["itl_slo_ms"]
    # Label powers of two only; NVL72's 24, 40, ..., 72 points stay unlabelled to keep ticks legible.
    eps = sorted({r["ep"] for res in results.values() for r in res["sweep"]
                  if (r["decode"] or r["prefill_tokens_per_s_per_gpu"]) and r["ep"] & (r["ep"] - 1) == 0})
    for ax, what in ((ax_d, f"decode output tokens/s per GPU (ITL <= {slo:g} ms, best batch)"),
                     (ax_p, "prefill input tokens/s per GPU")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(eps, [str(e) for e in eps])
        ax.minorticks_off()
        ax.set_xlabel("EP size (GPUs)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
