"""`moelink plan`: predicted throughput per GPU of MoE serving under DP attention + EP, from one H100 to an NVL72.

    moelink plan --model deepseek-v3 --hardware h100-hgx --ep 8 --batch-per-rank 128 \\
        [--input-len 2000 --output-len 1000 --itl-slo-ms 50 --precision fp8 ...] [--json out] [--plot out.png]
    moelink plan --model deepseek-v3 --hardware all --json ... --plot ...   # H100/H200/B200/B300 HGX, GB200/GB300 NVL72
    moelink plan --model deepseek-v3 --hardware all --report out.md   # $/M tokens, Pareto and cost plots
    moelink plan --engine published ...        # the published engines' modes (MTP, NVFP4, DeepEP) instead of moelink's
    moelink plan --calibrate [--json out]      # published results vs predictions: calibration and validation rows
                                               # (exit 1 if any is off by >30% or validation MAE > 15%)
    python -m moelink.engine.api.plan_cli ...   # the same, without the moelink CLI

The model lives in `moelink.planner` (step model, hardware, models,
calibration) and `moelink.comm.link_model` (links and all-to-all volume).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

from .cli_args import add_ep_flag
from .provenance import git_commit as _commit

README_HARDWARE = ("h100-hgx", "h200-hgx", "b200-hgx", "gb200-nvl72", "b300-hgx", "gb300-nvl72")
# The setup priced when --ep / --batch-per-rank are not given; the plan then details the best setup that fits
# instead of headlining this one (DeepSeek-V3's FP8 weights leave EP 8 on H100 no KV at all).
DEFAULT_EP, DEFAULT_BATCH_PER_RANK = 8, 128


def add_plan_args(p: argparse.ArgumentParser) -> None:
    from moelink.planner.hardware import PROFILES
    from moelink.planner.models import MODELS
    from moelink.planner.offload_tier import add_offload_args
    from moelink.planner.plan import PRECISIONS

    p.add_argument("--model", default="deepseek-v3", choices=sorted(MODELS))
    p.add_argument("--hardware", default="h100-hgx",
                   help=f"one of {', '.join(sorted(PROFILES))}, a comma-separated list, or 'all' "
                        f"({', '.join(README_HARDWARE)})")
    add_ep_flag(p, default=None, dest="ep",
                help=f"EP group size (GPUs) of the setup to detail (default {DEFAULT_EP}; with neither this nor "
                     "--batch-per-rank, the best setup that fits is detailed)")
    p.add_argument("--batch-per-rank", type=int, default=None,
                   help=f"decode sequences per GPU of the setup to detail (default {DEFAULT_BATCH_PER_RANK})")
    p.add_argument("--input-len", type=int, default=2000)
    p.add_argument("--output-len", type=int, default=1000)
    p.add_argument("--prefill-chunk", type=int, default=16384, help="prompt tokens per GPU per prefill forward")
    p.add_argument("--itl-slo-ms", type=float, default=50.0, help="per-user inter-token latency target")
    p.add_argument("--precision", default="fp8", choices=sorted(PRECISIONS))
    p.add_argument("--overlap", default="auto", choices=("auto", "tbo", "none"),
                   help="two-micro-batch overlap of all-to-all with compute (auto: the faster)")
    p.add_argument("--balance", default="eplb",
                   help="expert load: eplb, none, uniform, perfect, or a per-expert load cv (skew)")
    p.add_argument("--expert-counts", default=None,
                   help="JSON file of measured tokens per expert (a list, or {\"counts\": [...]}); overrides --balance")
    p.add_argument("--pattern", default="rank", choices=("rank", "expert", "node", "allgather"),
                   help="what the all-to-all sends: once per destination rank (moelink), per expert, per node, all")
    p.add_argument("--mtp-draft", type=int, default=0, help="multi-token-prediction draft tokens per step")
    p.add_argument("--mtp-accept", type=float, default=0.0, help="acceptance rate of each draft token")
    p.add_argument("--engine", default="moelink", choices=("moelink", "published"),
                   help="moelink: only the modes this engine has, its measured kernels; published: the engines "
                        "of the calibration table (DeepEP, MTP, NVFP4, ...)")
    p.add_argument("--gpu-hour-usd", type=float, default=None,
                   help="price of one GPU-hour (default: the hardware profile's assumed price)")
    p.add_argument("--utilization", type=float, default=1.0, help="average fraction of capacity served, (0, 1]")
    p.add_argument("--prefix-hit", type=float, default=0.0, help="fraction of prompt tokens found in the prefix cache")
    p.add_argument("--redundant-experts", type=int, default=None,
                   help="extra expert slots (replicas of hot experts); default: the fewest that divide over EP")
    p.add_argument("--attn-tp", type=int, default=1, help="tensor-parallel attention group size (published engine)")
    p.add_argument("--serving", default="disaggregated", choices=("disaggregated", "mixed"),
                   help="disaggregated prefill/decode pools, or mixed: both on every GPU (chunked prefill)")
    p.add_argument("--max-num-tokens", type=int, default=8192, help="mixed serving: tokens per iteration per rank")
    add_offload_args(p)
    p.add_argument("--report", dest="report_path", nargs="?", const="", default=None,
                   help="write a markdown cost report with Pareto and $/M-token plots (PNGs beside it); "
                        "without a path: cost_report_<model>.md here")
    p.add_argument("--calibrate", action="store_true", help="print the calibration table instead of a plan")
    p.add_argument("--json", dest="json_path", default=None, help="write the result as JSON here")
    p.add_argument("--plot", dest="plot_path", default=None, help="write throughput per GPU vs EP size (PNG)")



def _meta(argv_text: str) -> dict:
    return {"date": date.today().isoformat(), "commit": _commit(), "command": argv_text,
            "note": "predictions of the calibrated cluster model (no GPU was used)"}


def _hardware_list(text: str) -> list[str]:
    from moelink.planner.hardware import get_profile

    names = list(README_HARDWARE) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    for n in names:
        get_profile(n)  # raises ValueError naming the known profiles
    return names


def _calibrate(ns: argparse.Namespace) -> int:
    from moelink.planner.calibration import TOLERANCE, VALIDATION_MAE, run, summary
    from moelink.planner.report import format_calibration

    from moelink.planner.engine_measured import check
    from moelink.planner.engines import get_engine

    from moelink.planner.comm_sweep import comm_sweep, format_comm_sweep

    results = run()
    print(format_calibration(results))
    comm = comm_sweep()
    print("\nAll-to-all per layer across EP sizes (validation; DeepEP low-latency kernels, H800, 128 tokens/rank):")
    print(format_comm_sweep(comm))
    engine_rows = check(get_engine("moelink").efficiency)
    if engine_rows:
        print("\nmoelink's own engine (per-layer decode time, CUDA graph; batch 1 fits the fixed cost, "
              "the rest are checked):")
        print("| device | model | batch | measured us/layer | predicted | error |\n|---|---|---:|---:|---:|---:|")
        for r in engine_rows:
            print(f"| {r['device']} | {r['model']} | {r['batch']} | {r['measured_us']:.0f} | "
                  f"{r['predicted_us']:.0f} | {r['error']:+.1%} |")
    if ns.json_path:
        rows = [{"id": r.row.id, "split": r.row.split, "system": r.row.system, "hardware": r.row.hardware, "kind": r.row.kind,
                 "metric": r.row.metric, "published_per_gpu": r.row.published, "predicted_per_gpu": r.predicted,
                 "relative_error": r.error, "within_tolerance": r.ok, "source": r.row.source,
                 "assumed": r.row.assumed, "note": r.row.note} for r in results]
        split = ("calibration rows set or fit a constant (single-node rows fit Efficiency.gemm; SGLang's EPLB "
                 "ablation fits imbalance.SEQUENCE_CV, its TBO ablation sets the overlap fractions); validation "
                 "rows set nothing (comm_sweep: DeepEP's per-EP all-to-all latencies, validation)")
        _write_json(ns.json_path, {**_meta(ns.command_text), "tolerance": TOLERANCE,
                                   "validation_mae_target": VALIDATION_MAE, "split": split,
                                   "summary": summary(results), "rows": rows,
                                   "comm_sweep": comm, "moelink_engine_check": engine_rows})
    val = summary(results)["validation"]
    return 0 if all(r.ok for r in results) and val["mean_abs_error"] <= VALIDATION_MAE else 1


def _write_json(path: str, data: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")


def run_plan(ns: argparse.Namespace) -> int:
    """Entry point of `moelink plan` (and of `python -m moelink.engine.api.plan_cli`)."""
    if not getattr(ns, "command_text", None):
        ns.command_text = "moelink " + " ".join(sys.argv[1:])
    if ns.calibrate:
        return _calibrate(ns)
    from moelink.planner.hardware import get_profile
    from moelink.planner.models import get_model
    from moelink.planner.offload_tier import offload_from_args
    from moelink.planner.plan import PlanInputs, plan, with_hardware
    from moelink.planner.report import format_comparison, format_plan

    balance = ns.balance
    if ns.expert_counts:
        from moelink.planner.imbalance import Balance

        try:
            data = json.loads(Path(ns.expert_counts).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--expert-counts={ns.expert_counts!r} is not a readable JSON file: {exc}") from exc
        counts = data.get("counts") if isinstance(data, dict) else data
        if not isinstance(counts, list) or not all(isinstance(c, (int, float)) for c in counts):
            raise ValueError(f"--expert-counts={ns.expert_counts!r} must hold a list of numbers (or {{'counts': [...]}}).")
        balance = Balance("counts", counts=tuple(float(c) for c in counts))
    # A setup the user asked for is detailed (and said not to fit when it does not); without --ep and
    # --batch-per-rank, the best setup that fits is (the defaults only price the sweep's start).
    asked = ns.ep is not None or ns.batch_per_rank is not None
    base = PlanInputs(get_model(ns.model), get_profile(_hardware_list(ns.hardware)[0]),
                      ep=DEFAULT_EP if ns.ep is None else ns.ep,
                      batch_per_rank=DEFAULT_BATCH_PER_RANK if ns.batch_per_rank is None else ns.batch_per_rank,
                      input_len=ns.input_len, output_len=ns.output_len,
                      prefill_chunk=ns.prefill_chunk, itl_slo_ms=ns.itl_slo_ms, precision=ns.precision,
                      overlap=ns.overlap, balance=balance, pattern=ns.pattern, mtp_draft=ns.mtp_draft,
                      mtp_accept=ns.mtp_accept, engine=ns.engine, gpu_hour_usd=ns.gpu_hour_usd,
                      utilization=ns.utilization, prefix_hit=ns.prefix_hit, redundant_experts=ns.redundant_experts,
                      attn_tp=ns.attn_tp, serving=ns.serving, max_num_tokens=ns.max_num_tokens,
                      offload=offload_from_args(ns))
    results = {}
    for name in _hardware_list(ns.hardware):
        results[name] = plan_shown(with_hardware(base, get_profile(name)), asked)
        print(format_plan(results[name]))
        print()
    if len(results) > 1:
        print(format_comparison(results))
    if ns.json_path:
        _write_json(ns.json_path, {**_meta(ns.command_text), "results": results})
    if ns.plot_path:
        from moelink.planner.plots import plot_ep_sweep

        out = plot_ep_sweep(results, ns.plot_path, f"{ns.model}: predicted throughput per GPU vs EP size "
                                                   f"({ns.precision}, input {ns.input_len}, output {ns.output_len})")
        print(f"wrote {out}")
    if ns.report_path is not None:
        from moelink.planner.cost_report import write_report

        path = ns.report_path or f"cost_report_{ns.model}.md"
        for out in write_report(base, _hardware_list(ns.hardware), path, ns.command_text):
            print(f"wrote {out}")
    return 0


def plan_shown(inp, asked: bool) -> dict:
    """The plan of `inp` as `moelink plan` shows it: the setup asked for, or (none asked for) the best decode setup
    that fits, re-planned at its EP and batch so that the detail, memory and handoff lines are a setup that runs;
    `setup` says which ("asked", "best", or "defaults" when none fits)."""
    from moelink.planner.plan import plan

    res = plan(inp)
    if asked:
        return {**res, "setup": "asked"}
    best = res["best_decode_under_slo"]
    if best is None:
        return {**res, "setup": "defaults"}
    return {**plan(replace(inp, ep=best["ep"], batch_per_rank=best["batch_per_rank"])), "setup": "best"}


def register_cli(subparsers) -> None:
    """Add `moelink plan` to the main CLI (engine/api/cli.py calls this)."""
    p = subparsers.add_parser("plan", help="predict MoE serving throughput per GPU (cluster model); --calibrate")
    add_plan_args(p)
    p.set_defaults(func=run_plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelink.engine.api.plan_cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plan_args(parser)
    args = sys.argv[1:] if argv is None else argv
    ns = parser.parse_args(args)
    ns.command_text = "python -m moelink.engine.api.plan_cli " + " ".join(args)
    try:
        return run_plan(ns)
    except ValueError as exc:
        print(f"plan: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
