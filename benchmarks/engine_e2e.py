"""End to end against graph-only, in one run on one GPU: how much of its CUDA-graph decode step's throughput
`LLM.generate` and the gRPC server deliver.

    python -m moelink.benchmarks.engine_e2e [--models qwen3-30b-a3b,deepseek-v2-lite] [--dtypes bf16,fp8]
        [--workloads decode,balanced,prefill] [--batches 1,64,256] [--no-serve | --serve-only]
        [--quick] [--dry-run] [--cpu-smoke] [--out benchmarks/results/engine_e2e_<gpu>.json]

Models: Qwen3-30B-A3B and DeepSeek-V2-Lite as their published config.json numbers (`e2e_setup`), random weights
(`load_format="dummy"`), as many layers as fit beside the KV cache of the largest decode batch. Per model and dtype
(bf16; fp8 = `quantization="fp8"`), one LLM per step loop (async scheduling on, then off), each started, run
and shut down in turn:
  (a) graph-only: the engine's decode graph for batch 1, 64, 256 on the LLM's own model and cache (first LLM);
  (b) LLM.generate, token-id prompts, greedy, EOS ignored, detokenize=False: decode-heavy (128 in / 512 out,
      at each batch), balanced (1k in / 256 out, 64 requests), prefill-heavy (2k in / 8 out, 128 requests);
  (c) per model, bf16: `moelink serve` + the bench-serve load generator at 16 / 64 / 256 concurrent (128 in /
      256 out): TTFT and ITL p50/p99, output tok/s, and the TTFT of the very first request after start-up.
The side-by-side fields (e2e/graph ratio, host ms per step and how much of it overlapped the device) are
`e2e_report`'s; the planner's fixed cost per step is `planner/step_cost.py`'s rule over this file. Each generate
row also has its FLOP rates (`step_floor.generate_flops` over the layers built: `active_param_tflops_s`, the
products by weights alone, and `tflops_s` with causal attention and the LM head) and, on a GPU of known dense bf16
peak, their fractions of it (`frac_bf16_peak_active`, `frac_bf16_peak`); --kernel-times profiles one more round of
each prefill-heavy point (`kernel_family_us`, `kernel_us`: device microseconds by kernel family and by kernel).

--quick: Qwen3-30B-A3B, bf16, decode-heavy at 256 out, balanced at 32 and prefill-heavy at 64 requests, serve
with 2 rounds of 128 out, a 480 s budget: one GPU command. --cpu-smoke: a one-layer toy on CPU, one small point
of every part (serve included), for the test suite. Every point has a deadline (--point-timeout-s; the engine
start its own); a point that fails or runs out is recorded with its error and the rest go on; points not
started within --time-budget-s are recorded as skipped (one running then gets at most 60 s more). The JSON is rewritten after every point, so a run cut
short keeps what it measured; a point hung past its deadline + grace ends the process, recorded as hung.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import e2e_setup as setup
from .bench_timing import run_meta
from .e2e_report import Recorder, engine_table, error_text, serve_table

RESULTS = Path(__file__).parent / "results"
GRACE_S = 60.0  # past a point's deadline: a step or request still stuck that much later is a hang
TAIL_S = 60.0  # a point started just before the run's time budget ends runs at most this far past it
MODES = {  # batches, workloads, serve levels, serve in/out, rounds, time budget, point timeout, engine start timeout
    "full": dict(batches=[1, 64, 256], workloads=setup.FULL, levels=[16, 64, 256], serve_io=(128, 256), rounds=4,
                 budget=None, point=300.0, start=600.0, graph_steps=20, models=list(setup.MODELS), dtypes=["bf16", "fp8"]),
    "quick": dict(batches=[1, 64, 256], workloads=setup.QUICK, levels=[16, 64, 256], serve_io=(128, 128), rounds=2,
                  budget=480.0, point=150.0, start=300.0, graph_steps=10, models=["qwen3-30b-a3b"], dtypes=["bf16"]),
    "smoke": dict(batches=[2], workloads=setup.SMOKE_WORKLOADS, levels=[2], serve_io=(8, 4), rounds=1,
                  budget=None, point=60.0, start=60.0, graph_steps=2, models=["qwen3-30b-a3b"], dtypes=["bf16"]),
}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help=f"comma list of {', '.join(setup.MODELS)} (default: both; "
                                                   "--quick: qwen3-30b-a3b)")
    ap.add_argument("--dtypes", default=None, help="comma list of bf16, fp8 (default: both; --quick: bf16)")
    ap.add_argument("--workloads", default=None, help="comma list of decode, balanced, prefill (default: all)")
    ap.add_argument("--batches", default=None, help="decode-heavy and graph-only batch sizes (default 1,64,256)")
    ap.add_argument("--serve-levels", default=None, help="concurrent clients of the serving part (default 16,64,256)")
    parts = ap.add_mutually_exclusive_group()
    parts.add_argument("--no-serve", action="store_true", help="skip the gRPC serving part")
    parts.add_argument("--serve-only", action="store_true", help="only the gRPC serving part")
    ap.add_argument("--quick", action="store_true", help="a subset for one GPU command (<= 10 minutes)")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="start no point after this many seconds (default: none; --quick: 480)")
    ap.add_argument("--point-timeout-s", type=float, default=None, help="deadline of each point (default 300; "
                                                                        "--quick 150)")
    ap.add_argument("--kernel-times", action="store_true",
                    help="after each prefill-heavy point, one more round under torch.profiler: its device time by "
                         "kernel family (moe, attention, matmul, norm, other) and its top kernels")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/engine_e2e_<gpu>.json)")
    ap.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    ap.add_argument("--cpu-smoke", action="store_true", help="a toy model on CPU: checks the script only")
    ns = ap.parse_args(argv)
    mode = dict(MODES["smoke" if ns.cpu_smoke else "quick" if ns.quick else "full"])

    def pick(text, default, allowed=None, cast=str):
        if text is None:
            return list(default)
        vals = [cast(x.strip()) for x in text.split(",") if x.strip()]
        bad = [v for v in vals if allowed is not None and v not in allowed]
        if bad or not vals:
            ap.error(f"{text!r}: choose from {', '.join(map(str, allowed or []))}")
        return vals

    ns.models = pick(ns.models, mode["models"], setup.MODELS)
    ns.dtypes = pick(ns.dtypes, mode["dtypes"], setup.DTYPES)
    ns.workloads = [mode["workloads"][w] for w in pick(ns.workloads, mode["workloads"], mode["workloads"])]
    ns.batches = pick(ns.batches, mode["batches"], cast=int)
    ns.levels = pick(ns.serve_levels, mode["levels"], cast=int)
    if min(ns.batches + ns.levels) < 1:
        ap.error("--batches and --serve-levels must be positive")
    ns.mode = mode
    ns.time_budget_s = ns.time_budget_s if ns.time_budget_s is not None else mode["budget"]
    ns.point_timeout_s = ns.point_timeout_s or mode["point"]
    if (ns.time_budget_s is not None and ns.time_budget_s < 0) or ns.point_timeout_s <= 0:
        ap.error("--time-budget-s must be >= 0 and --point-timeout-s > 0")
    return ns


# -- what runs ------------------------------------------------------------------------------------------------------
def plan(ns, fields: set[str]) -> list[dict]:
    """The run as groups: one per engine (model, dtype, loop) with its points, then one serving group per model."""
    groups = []
    if not ns.serve_only:
        for model in ns.models:
            for dtype in ns.dtypes:
                for i, am in enumerate(setup.async_modes(fields)):
                    points = []
                    if i == 0 and any(w.name == "decode" for w in ns.workloads):
                        points += [dict(part="graph", batch=b) for b in ns.batches]
                    points += [dict(part="generate", workload=w, batch=n) for w in ns.workloads
                               for n in setup.workload_requests(w, ns.batches)]
                    groups.append(dict(kind="engine", model=model, dtype=dtype, async_scheduling=am, points=points))
    if not ns.no_serve:
        for model in ns.models:
            groups.append(dict(kind="serve", model=model, dtype=ns.dtypes[0], levels=ns.levels))
    return groups


def describe(groups: list[dict], ns) -> str:
    lines = []
    for g in groups:
        if g["kind"] == "serve":
            i, o = ns.mode["serve_io"]
            lines.append(f"serve  {g['model']} {g['dtype']}: `moelink serve` + bench-serve at {g['levels']} concurrent, "
                         f"{i} in / {o} out, {ns.mode['rounds']} rounds; first request's TTFT")
            continue
        lines.append(f"engine {g['model']} {g['dtype']} async_scheduling={g['async_scheduling']}:")
        for p in g["points"]:
            if p["part"] == "graph":
                lines.append(f"  graph-only decode step, batch {p['batch']}")
            else:
                w = p["workload"]
                lines.append(f"  LLM.generate {w.what}: {p['batch']} requests x ({w.input_len} in / {w.output_len} out)")
    lines.append(f"every point within {ns.point_timeout_s:.0f} s; run budget "
                 + (f"{ns.time_budget_s:.0f} s" if ns.time_budget_s is not None else "none"))
    return "\n".join(lines)


# -- the parts ------------------------------------------------------------------------------------------------------
def run_engine_group(g: dict, ctx: dict, rec: Recorder, ns) -> None:
    from .e2e_generate import build_llm, graph_step_s, profile_generate, run_generate

    head = dict(model=g["model"], dtype=g["dtype"], async_scheduling=g["async_scheduling"])

    def skip_all(reason):
        for p in g["points"]:
            rec.add(_point_row(head, p, error=reason))

    if ctx["error"]:
        return skip_all(ctx["error"])
    if ctx["over_budget"]():
        return skip_all("skipped: the run's time budget was spent before it started")
    start_deadline = time.monotonic() + ns.mode["start"]
    row = dict(part="startup", **head, layers=ctx["layers"])
    rec.arm(start_deadline, row)
    t0 = time.perf_counter()
    try:
        llm = build_llm(ctx["dir"], g["dtype"], g["async_scheduling"], max_num_seqs=ctx["max_num_seqs"],
                        max_model_len=ctx["max_model_len"], device=ctx["device"], dummy=ctx["dummy"])
    except Exception as exc:  # recorded; the other groups go on
        rec.disarm()
        rec.add(dict(row, error=error_text(exc)))
        return skip_all(f"the engine did not start: {error_text(exc)}")
    rec.disarm()
    rec.add(dict(row, startup_s=time.perf_counter() - t0, error=None))
    print(f"{g['model']} {g['dtype']} async_scheduling={g['async_scheduling']}: engine up in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    decode = next((w for w in ns.workloads if w.name == "decode"), None)
    try:
        for p in g["points"]:
            if ctx["over_budget"]():
                rec.add(_point_row(head, p, error="skipped: out of the run's time budget"))
                continue
            deadline = ctx["point_deadline"]()
            row = _point_row(head, p)
            rec.arm(deadline, row)
            try:
                if p["part"] == "graph":
                    context = setup.decode_context(decode)
                    t, kind = graph_step_s(llm, p["batch"], context, ns.mode["graph_steps"])
                    row.update(context=context, graph_ms=t * 1e3, graph_tok_s=p["batch"] / t, kind=kind)
                else:
                    w = p["workload"]
                    row.update(run_generate(llm, p["batch"], w.input_len, w.output_len, deadline))
                    row.update(flop_rates(ctx, p["batch"], w, row["wall_s"]))
                    if ns.kernel_times and w.name == "prefill":  # one more round, profiled: where its time is
                        row.update(profile_generate(llm, p["batch"], w.input_len, w.output_len, ctx["device"]))
            except Exception as exc:
                row["error"] = error_text(exc)
            rec.disarm()
            rec.add(row)
            print("  " + _point_line(row), flush=True)
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def flop_rates(ctx: dict, requests: int, w, wall_s: float) -> dict:
    """A generate point's FLOP rates (step_floor.generate_flops over the layers built) and, on a GPU whose dense bf16
    peak is known, the fractions of it: `frac_bf16_peak_active` counts the products by weights alone (2 x active
    parameters a token: issue 80's prefill row), `frac_bf16_peak` attention's and the LM head's too."""
    from .step_floor import bf16_peak_tflops, generate_flops

    f = generate_flops(ctx["hf"], ctx["layers"], requests, w.input_len, w.output_len)
    out = dict(flops=f, active_param_tflops_s=f["linear"] / wall_s / 1e12, tflops_s=f["total"] / wall_s / 1e12)
    peak = bf16_peak_tflops(ctx["device_name"])
    if peak is not None:
        out.update(bf16_peak_tflops=peak, frac_bf16_peak_active=out["active_param_tflops_s"] / peak,
                   frac_bf16_peak=out["tflops_s"] / peak)
    return out


def _point_row(head: dict, p: dict, error: str | None = None) -> dict:
    row = dict(part=p["part"], **head, batch=p["batch"], error=error)
    if p["part"] == "generate":
        w = p["workload"]
        row.update(workload=w.name, input_len=w.input_len, output_len=w.output_len)
    return row


def _point_line(r: dict) -> str:
    name = "graph-only" if r["part"] == "graph" else r["workload"]
    if r.get("error"):
        return f"{name} batch {r['batch']}: {r['error'][:160]}"
    if r["part"] == "graph":
        return f"graph-only batch {r['batch']}: {r['graph_ms']:.3f} ms, {r['graph_tok_s']:.0f} tok/s ({r['kind']})"
    return (f"{name} batch {r['batch']}: {r['e2e_tok_s']:.0f} out tok/s, {r['steps']} steps, median step "
            f"{r['step_ms']:.2f} ms, {r['wall_s']:.1f} s")


def run_serve_group(g: dict, ctx: dict, rec: Recorder, ns) -> None:
    from .e2e_serve import run_serve

    head = dict(part="serve", model=g["model"], dtype=g["dtype"])
    if ctx["error"] or ctx["over_budget"]():
        for c in g["levels"]:
            rec.add(dict(head, concurrency=c, error=ctx["error"] or "skipped: out of the run's time budget"))
        return
    i, o = ns.mode["serve_io"]
    torch_dtype, quant = setup.DTYPES[g["dtype"]]
    args = (f"--dtype {torch_dtype} --max-num-seqs {max(g['levels'])} --max-model-len {ctx['max_model_len']} "
            f"--device {ctx['device']}" + (" --load-format dummy" if ctx["dummy"] else "")
            + (f" --quantization {quant}" if quant else ""))
    # The server's start, then one point's time per level; a time budget's end caps the levels, not the start.
    now = time.monotonic()
    deadline = now + ns.mode["start"] + min(ns.point_timeout_s * len(g["levels"]), ctx["budget_end"] + TAIL_S - now)
    rec.arm(deadline, dict(head, concurrency=None))
    try:
        res = run_serve(ctx["dir"], args, g["levels"], i, o, ns.mode["rounds"], deadline,
                        start_timeout_s=ns.mode["start"])
    except Exception as exc:
        rec.disarm()
        for c in g["levels"]:
            rec.add(dict(head, concurrency=c, error=error_text(exc)))
        return
    rec.disarm()
    first = res["first_request"]
    for lv in res["levels"]:
        rec.add(dict(head, **lv, input_len=i, output_len=o, error=lv.get("error"), startup_s=res["startup_s"],
                     first_request_ttft_ms=first["ttft_ms"], first_request_error=first["error"]))


def model_context(model: str, ns, fields: set[str], tmp: Path, device: torch.device) -> dict:
    """Per model: its directory, layers, engine sizes and the reason it cannot run, if any."""
    hf = setup.SMOKE_HF if ns.cpu_smoke else setup.MODELS[model][0]
    lens = [w.input_len + w.output_len for w in ns.workloads] + [sum(ns.mode["serve_io"])]
    ctx = dict(device=device.type, device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               hf=hf, max_model_len=max(lens) + 16, error=None, dummy="load_format" in fields,
               max_num_seqs=max(ns.batches + [w.requests for w in ns.workloads] + ns.levels))
    ctx["layers"] = hf["num_hidden_layers"] if device.type != "cuda" else setup.layers_that_fit(
        hf, ns.workloads, ns.batches, device)
    if not ctx["dummy"] and not ns.cpu_smoke:
        ctx["error"] = f"not run: {setup.missing_reason('load_format')}; the models have no weights on disk"
    elif not ctx["dummy"]:  # the smoke still runs: a toy checkpoint with weights stands in
        ctx["dir"] = str(setup.write_smoke_checkpoint(tmp / model))
    else:
        ctx["dir"] = str(setup.write_model_dir(tmp / model, hf, ctx["layers"], ctx["max_model_len"]))
    return ctx


def main(argv=None) -> dict:
    ns = parse_args(argv)
    fields = setup.engine_fields()
    groups = plan(ns, fields)
    if ns.dry_run:
        print(describe(groups, ns))
        return dict(groups=len(groups))
    if ns.cpu_smoke:
        device = torch.device("cpu")
    else:
        from .bench_timing import require_cuda

        device = require_cuda("engine_e2e")
    meta = run_meta(device)
    notes = [setup.missing_reason(f) + ": " + what for f, what in
             (("async_scheduling", "only the engine's one loop ran (recorded as async_scheduling null)"),
              ("load_format", "the CPU smoke used a toy checkpoint with weights"
               if ns.cpu_smoke else "nothing could be built"))
             if f not in fields]
    tag = "cpu_smoke" if ns.cpu_smoke else meta["device"].replace(" ", "_") + ("_quick" if ns.quick else "")
    out = Path(ns.out or RESULTS / f"engine_e2e_{tag}.json")
    doc = dict(benchmark="engine_e2e", format=1, **meta, quick=ns.quick, cpu_smoke=ns.cpu_smoke,
               config=dict(models=ns.models, dtypes=ns.dtypes, batches=ns.batches, serve_levels=ns.levels,
                           workloads={w.name: dict(input_len=w.input_len, output_len=w.output_len,
                                                   requests=w.requests or "per batch") for w in ns.workloads},
                           serve_io=list(ns.mode["serve_io"]), serve_rounds=ns.mode["rounds"],
                           point_timeout_s=ns.point_timeout_s, time_budget_s=ns.time_budget_s,
                           engine_has=sorted(f for f in ("async_scheduling", "load_format") if f in fields)),
               notes=notes, rows=[], host_timing=None)
    for n in notes:
        print(f"note: {n}")
    rec = Recorder(doc, out, 20.0 if ns.cpu_smoke else GRACE_S)
    try:
        return _run(ns, fields, groups, device, doc, rec, out)
    finally:
        rec.close()


def _run(ns, fields, groups, device, doc, rec, out) -> dict:
    t_start = time.monotonic()
    end = t_start + ns.time_budget_s if ns.time_budget_s is not None else float("inf")

    def over() -> bool:
        return time.monotonic() > end

    def point_deadline() -> float:
        return min(time.monotonic() + ns.point_timeout_s, end + TAIL_S)
    with tempfile.TemporaryDirectory(prefix="moelink-e2e-") as tmp:
        ctxs = {}
        for g in groups:
            if g["model"] not in ctxs:
                ctxs[g["model"]] = dict(model_context(g["model"], ns, fields, Path(tmp), device), over_budget=over,
                                        point_deadline=point_deadline, budget_end=end)
                print(f"{g['model']}: {ctxs[g['model']]['layers']} layers built", flush=True)
            (run_engine_group if g["kind"] == "engine" else run_serve_group)(g, ctxs[g["model"]], rec, ns)
    doc["layers"] = {m: c["layers"] for m, c in ctxs.items()}
    doc["wall_s"] = time.monotonic() - t_start
    rec.save()  # (derives the side-by-side fields _finish reads)
    _finish(doc)
    rec.save()
    print(f"wrote {out}")
    return doc


def _finish(doc: dict) -> None:
    from moelink.planner.step_cost import fixed_step_cost

    print(engine_table(doc["rows"]))
    if any(r["part"] == "serve" for r in doc["rows"]):
        print(serve_table(doc["rows"]))
    print(f"host ms per step: {doc['host_timing'] or 'no decode-heavy row beside its graph-only step'}")
    try:
        ms, what = fixed_step_cost(doc)
        doc["planner_fixed_step_cost_ms"] = ms
        print(f"moelink plan's fixed cost per step from this file: {ms:.2f} ms ({what})")
    except ValueError as exc:
        doc["planner_fixed_step_cost_ms"] = None
        print(f"moelink plan cannot take its fixed cost per step from this file: {exc}")


if __name__ == "__main__":
    main()
    sys.exit(0)
