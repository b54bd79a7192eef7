"""Join a real Ray head started with `ray start --head` on 127.0.0.1 (address="auto")."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from moelink.engine import LLM, SamplingParams

RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(RAY is None, reason="the `ray` command is not installed")
def test_generate_on_ray_head_started_by_ray_start(tiny_model, tmp_path):
    path = tiny_model("mixtral_e5k3")
    prompts = [[3, 4, 5, 6], [7] * 40, [9, 10]]
    want = [o.outputs[0].token_ids for o in LLM(path, dtype="float64").generate(
        prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)]

    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", MOELINK_MASTER_ADDR="127.0.0.1")
    port = _free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "4", "--include-dashboard", "false", "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        client = textwrap.dedent(f"""
            import json
            from moelink.engine import LLM, SamplingParams
            llm = LLM({path!r}, dtype="float64", expert_parallel_size=2, ray_address="auto")
            outs = llm.generate({prompts!r}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
            print("RESULT", json.dumps([o.outputs[0].token_ids for o in outs]))
            llm.engine.shutdown()
        """)
        deadline = time.monotonic() + 120
        last = None
        while time.monotonic() < deadline:  # the head needs a few seconds before it takes drivers
            proc = subprocess.run([sys.executable, "-c", client], env=env, capture_output=True, text=True, timeout=240)
            last = proc
            if proc.returncode == 0:
                break
            if "ConnectionError" not in proc.stderr and "Could not find any running Ray instance" not in proc.stderr:
                break
            time.sleep(2)
        assert last.returncode == 0, last.stderr[-3000:]
        line = next(ln for ln in last.stdout.splitlines() if ln.startswith("RESULT "))
        assert json.loads(line[len("RESULT "):]) == want
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
