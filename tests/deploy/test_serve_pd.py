"""deploy/ray/serve_pd.sh on one CPU host, without Ray: a prefill server, a decode server and smg in PD mode start,
a completion comes back through the OpenAI API, and SIGTERM to the script stops all three (by PID)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import zygote
from tests.helpers.grpc_server import ENGINE_FLAGS
from tests.helpers.net import free_port
from tests.helpers.smg_gateway import http_request, smg_executable
from tests.helpers.waits import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_serve_pd_sh_serves_through_smg_and_stops_everything(tmp_path, tiny_model):
    smg = smg_executable()
    if smg is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    model = tiny_model("qwen3_e6k3")
    # The two servers' `python -m moelink.engine.api.cli` go through the test zygote's shim (tests/helpers/zygote.py:
    # forked with torch imported, ~2 s of CPU less each; the shim stays the script's child and passes its signals on),
    # else the plain interpreter.
    shim = zygote.shim_env()
    wrapper = tmp_path / "moelink"
    wrapper.write_text(f"#!/bin/sh\nexec {shim.get('PYTHON', sys.executable)} -m moelink.engine.api.cli \"$@\"\n")
    wrapper.chmod(0o755)
    http_port = free_port()
    env = {**os.environ, **shim, "MOELINK": str(wrapper), "SMG": smg, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    cmd = [str(ROOT / "deploy/ray/serve_pd.sh"), model, "--kv-port", str(free_port()), "--http-port", str(http_port),
           "--prefill-port", str(free_port()), "--decode-port", str(free_port()), "--", *ENGINE_FLAGS,
           "--served-model-name", "tiny-moe"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        line = wait_until(lambda: _ready_line(proc), 120.0, "serve_pd.sh to print its OpenAI address", interval=0.2)
        assert f"http://127.0.0.1:{http_port}/v1" in line
        # smg's, then the two servers': the script's three children
        children = wait_until(lambda: (lambda c: c if len(c) == 3 else None)(_children(proc.pid)), 10.0,
                              "the script's three processes", interval=0.1)

        def answered():
            try:
                status, raw = http_request(http_port, "POST", "/v1/completions", dict(
                    model="tiny-moe", prompt="Once upon a time " * 5, max_tokens=4, temperature=0.0), timeout=10)
            except OSError:
                return None
            return raw if status == 200 else None

        out = json.loads(wait_until(answered, 60.0, "a completion through smg's PD mode", interval=0.5))
        assert out["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in children):
            time.sleep(0.2)
        assert not [p for p in children if _alive(p)], "serve_pd.sh left processes behind"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


_lines: list[str] = []


def _ready_line(proc):
    import select

    assert proc.poll() is None, f"serve_pd.sh exited with {proc.returncode}: {''.join(_lines)[-3000:]}"
    while select.select([proc.stdout], [], [], 0)[0]:
        line = proc.stdout.readline()
        if not line:
            break
        _lines.append(line)
        if line.startswith("moelink PD:"):
            return line
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (already exited, not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
