"""A `moelink serve` subprocess for the serving benchmarks (serve_load, hostile_requests): started on a free
loopback port with gRPC only, stopped by PID."""
from __future__ import annotations

import selectors
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional


def start_server(model: str, extra: str = "", timeout_s: float = 120.0,
                 http_port: Optional[int] = None) -> tuple[subprocess.Popen, str]:
    """Start `moelink serve MODEL --port 0`; returns (process, 'host:port') once it serves (with `http_port`, its
    OpenAI API serves there by then too: the server says it serves once its gateway does)."""
    # --no-http unless asked: a gRPC benchmark needs no managed HTTP gateway taking port 8000 and a core.
    http = ["--no-http"] if http_port is None else ["--http-port", str(http_port)]
    cmd = [sys.executable, "-m", "moelink.engine.api.cli", "serve", model, "--host", "127.0.0.1", "--port", "0",
           *http, *shlex.split(extra)]
    # Its stderr goes to an unnamed file, so that a server that dies before serving says why (an import missing
    # on the machine, the memory taken): the error carries the file's last lines.
    with tempfile.TemporaryFile() as err:  # (the child keeps its own descriptor of it)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.monotonic() + timeout_s
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"`moelink serve` exited with {proc.returncode} before serving{_tail(err)}")
            if sel.select(timeout=0.5):
                line = proc.stdout.readline()
                if line.startswith("moelink: serving"):
                    addr = line.split(" on ", 1)[1].split(" ", 1)[0]
                    return proc, addr
        stop_server(proc)
        raise RuntimeError(f"`moelink serve` did not start within {timeout_s:.0f} s{_tail(err)}")


def _tail(err, lines: int = 6, max_bytes: int = 4000) -> str:
    """': ' and the last lines of the server's stderr file (its traceback's end), or ''."""
    err.seek(0, 2)
    err.seek(max(0, err.tell() - max_bytes))
    text = err.read().decode(errors="replace").strip().splitlines()[-lines:]
    return (": " + " | ".join(text)) if text else ""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server's --metrics-port; another process could take it before the
    server binds, then the server refuses to start with a message naming the port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
