"""The smg gateway in front of a worker, for the gateway tests (not a test module): find it, launch it on
127.0.0.1, wait until it has registered the worker, call its HTTP API."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from .net import free_port
from .waits import wait_until

SMG_READY_TIMEOUT_S = 60.0


def smg_executable():
    exe = shutil.which("smg") or os.path.join(os.path.dirname(sys.executable), "smg")
    return exe if os.path.exists(exe) else None


def http_request(port: int, method: str, path: str, body=None, headers=None, timeout: float = 30.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def sse_events(resp, stop_after: int | None = None) -> list[dict]:
    """The JSON events of a streamed response (`data:` lines, [DONE] left out), at most `stop_after` of them (the
    caller then closes the connection with the stream open). Bounded by the socket's timeout: a hang fails."""
    events = []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        events.append(json.loads(line[5:].strip()))
        if stop_after is not None and len(events) >= stop_after:
            break
    return events


NOT_READY_RETRY_S = 30.0  # smg lists a model before its tokenizer is registered: "retry shortly" (a 503)


def completion_text(port: int, body: dict, timeout: float = 60.0) -> tuple[str, list[dict]]:
    """POST /v1/completions: (the text, the stream's events, [] when not streamed); asserts a 200. A 503 that says
    the gateway is not ready yet (smg 1.13 answers `tokenizer_not_ready` for a moment after /v1/models lists the
    model) is retried for a bounded time; any other status fails at once."""
    deadline = time.monotonic() + NOT_READY_RETRY_S
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("POST", "/v1/completions", body=json.dumps(body),
                         headers={"content-type": "application/json"})
            resp = conn.getresponse()
            if resp.status == 503 and time.monotonic() < deadline:
                raw = resp.read()
                if b"not_ready" in raw or b"retry" in raw:
                    time.sleep(0.2)
                    continue
                raise AssertionError(raw)
            if not body.get("stream"):
                raw = resp.read()
                assert resp.status == 200, raw
                return json.loads(raw)["choices"][0]["text"], []
            assert resp.status == 200, resp.read()
            events = sse_events(resp)
        finally:
            conn.close()
        return "".join(c["text"] for e in events for c in e["choices"]), events


@contextlib.contextmanager
def launch_smg_with(*args: str):
    """`smg launch` on 127.0.0.1 with `args` (the workers), in a session of its own: `smg launch` is a launcher
    whose router runs as a child process, so it is stopped as a process group (SIGTERM, then SIGKILL), or a
    killed launcher would leave its router listening. Yields (HTTP port, process, log path)."""
    exe = smg_executable()
    if exe is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    port, metrics_port = free_port(), free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="smg-", suffix=".log", delete=False)
    proc = subprocess.Popen([exe, "launch", "--host", "127.0.0.1", "--port", str(port),
                             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
                             "--log-level", "warn", "--shutdown-grace-period-secs", "1", *args],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield port, proc, log.name
    finally:
        stop_group(proc)
        log.close()
        os.unlink(log.name)


def stop_group(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """Stop `proc` and every process of its session (started with start_new_session=True)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group (a router whose launcher is gone)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(10)


def launch_smg(worker_url: str, *extra: str):
    """`smg launch` on 127.0.0.1 in front of one worker; yields its HTTP port once it lists a model."""
    return launch_smg_with("--worker-urls", worker_url, *extra)


def launch_smg_pd(prefill_addr: str, decode_addr: str, model_path: str, *extra: str):
    """`smg launch` in its prefill/decode mode in front of one gRPC prefill and one gRPC decode server."""
    return launch_smg_with("--pd-disaggregation", "--prefill", f"grpc://{prefill_addr}", "--decode",
                           f"grpc://{decode_addr}", "--model-path", model_path, *extra)


def wait_models(port: int, proc, log_name: str, headers=None) -> list[str]:
    """The model ids smg lists once it has registered the worker (polled: smg is another process)."""
    def models():
        assert proc.poll() is None, f"smg exited with {proc.returncode}: {open(log_name).read()[-3000:]}"
        try:
            status, body = http_request(port, "GET", "/v1/models", headers=headers, timeout=2)
            ids = [m["id"] for m in json.loads(body)["data"]] if status == 200 else []
            if ids and "unknown" not in ids:
                return ids
        except (OSError, ValueError, KeyError):
            pass
        return None

    return wait_until(models, SMG_READY_TIMEOUT_S, "smg to register the worker", interval=0.2,
                      detail=lambda: open(log_name).read()[-3000:])
