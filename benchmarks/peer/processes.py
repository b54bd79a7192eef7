"""The processes the comparison beside vLLM starts (benchmarks/peer_vllm.py, benchmarks/lm_eval_compare.py): a
free loopback port, a command run in its own process group with its output in a log and a bound on its time, a
server waited for until it answers, a process group stopped by its PID (SIGTERM, then SIGKILL, bounded waits), and
the CPU a server's session used."""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM to the process group this benchmark started (its PID), then SIGKILL after a bounded wait."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_logged(cmd: list[str], log: Path, timeout_s: float, env: Optional[dict] = None) -> int:
    """Run cmd in its own process group, output to log; stopped by PID when it outlives timeout_s."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise RuntimeError(f"{shlex.join(cmd[:4])} ... ran past {timeout_s:.0f} s; log: {tail(log)}")
        except BaseException:
            stop(proc)
            raise


def wait_http_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before serving:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{url} not ready within {timeout_s:.0f} s:\n{tail(log)}")


def session_cpu_s(sid: int) -> float:
    """CPU seconds (user + system) of the processes now in session `sid` (a server started in a session of its
    own: its front, engine and rank processes). Linux /proc; 0.0 where it cannot be read."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(f[3]) == sid:  # fields after the name: state, ppid, pgrp, session, ..., utime (12), stime (13)
            total += int(f[11]) + int(f[12])
    return total / tick


__all__ = ["free_port", "run_logged", "session_cpu_s", "stop", "tail", "wait_http_ready"]
