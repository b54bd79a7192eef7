"""`moelink plan --report out.md`: the cost report, a table and two plots a person would rather look at.

- Pareto plot: per hardware, decode output tok/s per GPU against tok/s per user (1 / inter-token
  latency) over every EP size and batch that fits; only the frontier is drawn (no layout is both faster
  per GPU and per user than a point on it).
- Cost plot: $ per million output tokens at the best decode layout under the ITL target, per hardware
  and (engine, precision): moelink's own precisions, and the published engines' FP8 and FP4 beside them
  (FP4 only on GPUs with FP4 tensor cores).

PNGs are written beside the markdown (out.md -> out_pareto.png, out_cost.png).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .engines import get_engine
from .hardware import get_profile
from .plan import BATCH_CANDIDATES, PlanInputs, decode_at, ep_candidates, fits, plan, with_hardware


def pareto_points(inp: PlanInputs) -> list[tuple[float, float, int, int]]:
    """Frontier of (tok/s/user, tok/s/GPU, ep, batch) over EP sizes and batches that fit, sorted by
    tok/s/user: each point is faster per GPU than every point faster per user than it."""
    pts = []
    for ep in ep_candidates(inp.model, inp.hardware, inp.redundant_experts):
        for batch in BATCH_CANDIDATES:
            if not fits(inp, ep, batch):
                break
            res, _ = decode_at(inp, ep, batch)
            pts.append((1.0 / res.itl_s, res.tokens_per_s, ep, batch))
    front, best = [], -1.0
    for p in sorted(pts, key=lambda p: (-p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return sorted(front)


def _variants(inp: PlanInputs) -> list[tuple[str, str]]:
    """(engine, precision) pairs priced: the asked engine's precisions, then the published engines'."""
    out = [(inp.engine, p) for p in get_engine(inp.engine).precisions]
    if inp.engine != "published":
        out += [("published", p) for p in ("fp8", "fp4")]
    return out


def _plot_pareto(fronts: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and GPU boxes have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    styles = ("-", "--", "-.", ":")  # profiles that share a GPU generation overlap: keep both visible
    for n, (hw, pts) in enumerate(fronts.items()):
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=hw,
                    linestyle=styles[n % len(styles)])
    ax.set_xlabel("tokens/s per user (1 / inter-token latency)")
    ax.set_ylabel("decode output tokens/s per GPU")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_cost(costs: dict, variants: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hws = list(costs)
    fig, ax = plt.subplots(figsize=(9, 5.2))
    width = 0.8 / len(variants)
    for j, (eng, prec) in enumerate(variants):
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(hws))]
        ys = [costs[hw].get((eng, prec)) or 0.0 for hw in hws]
        bars = ax.bar(xs, ys, width, label=f"{eng} {prec}")
        for b, y in zip(bars, ys):
            if y:
                ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(hws)), hws)
    ax.set_ylabel("$ per million output tokens (decode GPUs)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(base: PlanInputs, hardware: list[str], path: str | Path, command: str = "") -> list[Path]:
    """Plan every hardware x (engine, precision), write the markdown and both PNGs; returns their paths."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    variants = _variants(base)
    plans, costs, fronts = {}, {}, {}
    for name in hardware:
        hw_inp = with_hardware(base, get_profile(name))
        costs[name] = {}
        for eng, prec in variants:
            if prec == "fp4" and "nvfp4" not in hw_inp.hardware.gpu.tflops:
                continue  # no FP4 tensor cores (Hopper): no engine serves NVFP4 experts there
            # The asked all-to-all pattern where the engine has it, else moelink's (once per rank).
            pattern = hw_inp.pattern if hw_inp.pattern in get_engine(eng).patterns else "rank"
            res = plan(replace(hw_inp, engine=eng, precision=prec, pattern=pattern))
            plans[(name, eng, prec)] = res
            costs[name][(eng, prec)] = (res["cost"] or {}).get("usd_per_m_output")
        fronts[name] = pareto_points(hw_inp)
    pareto_png, cost_png = out.with_name(out.stem + "_pareto.png"), out.with_name(out.stem + "_cost.png")
    what = (f"{base.model.name}, input {base.input_len}, output {base.output_len}, "
            f"prefix hits {base.prefix_hit:.0%}")
    _plot_pareto(fronts, pareto_png, f"{what}: decode frontier, engine {base.engine}, {base.precision}")
    _plot_cost(costs, variants, cost_png, f"{what}: $/M output tokens at ITL <= {base.itl_slo_ms:g} ms")
    lines = [f"# Cost report: {base.model.name}", "",
             f"Predictions of the cluster model (`moelink plan`), not measurements. Command: `{command}`", "",
             f"Workload: input {base.input_len}, output {base.output_len} tokens, prefix-cache hits "
             f"{base.prefix_hit:.0%}, inter-token latency <= {base.itl_slo_ms:g} ms, utilization "
             f"{base.utilization:.0%}.", "",
             "| hardware | engine | precision | decode EP | batch/GPU | decode tok/s/GPU | tok/s/user | "
             "prefill tok/s/GPU | $/GPU-h | $/M output | $/M input | prefill:decode GPUs |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (name, eng, prec), res in plans.items():
        b, bp, c = res["best_decode_under_slo"], res["best_prefill"], res["cost"] or {}
        dec = (f"{b['ep']} | {b['batch_per_rank']} | {b['tokens_per_s_per_gpu']:,.0f} | "
               f"{b['tokens_per_s_per_user']:.1f}" if b else "- | - | - | -")
        pre = f"{bp['tokens_per_s_per_gpu']:,.0f}" if bp else "-"
        money = (f"{c['gpu_hour_usd']:.2f} | {c['usd_per_m_output']:.3f} | {c['usd_per_m_input']:.3f} | "
                 f"{c['prefill_to_decode_gpus']:.2f}" if c.get("usd_per_m_output") is not None else "- | - | - | -")
        lines.append(f"| {name} | {eng} | {prec} | {dec} | {pre} | {money} |")
    lines += ["", f"![decode Pareto frontier]({pareto_png.name})", "", f"![$ per M output tokens]({cost_png.name})",
              ""]
    first = plans[(hardware[0], base.engine, base.precision)] if (hardware[0], base.engine, base.precision) in plans \
        else next(iter(plans.values()))
    lines += ["## What the moelink prediction assumes", ""]
    lines += [f"- [{'x' if f.get('used', True) else ' '}] {f['feature']}: **{f['status']}**"
              + (f" ({f['evidence']})" if f["evidence"] else "") for f in first["engine"]["features"]]
    lines += ["", "[x]: this report's moelink predictions assume it."]
    lines += ["", f"## Assumptions ({hardware[0]})", ""] + [f"- {a}" for a in first["assumptions"]]
    lines += ["", "GPU-hour prices are assumptions (planner/hardware.py `GPU_HOUR_USD`); `--gpu-hour-usd` "
              "overrides them. $/M output counts decode GPUs, $/M input prefill GPUs (computed tokens only)."]
    out.write_text("\n".join(lines) + "\n")
    return [out, pareto_png, cost_png]
