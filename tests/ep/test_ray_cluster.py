"""Join a real Ray head started with `ray start --head` on 127.0.0.1, by its explicit address.

Not address="auto": that reads machine-wide state (/tmp/ray/ray_current_cluster), which names whatever
Ray started last on this machine, and made this test join another instance and time out."""
from __future__ import annotations

import json
import os
import secrets
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

    # Ray's token auth, as deploy/ray documents it: one shared secret for the head and every driver.
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", MOELINK_MASTER_ADDR="127.0.0.1",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
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
            llm = LLM({path!r}, dtype="float64", expert_parallel_size=2, ray_address="127.0.0.1:{port}")
            outs = llm.generate({prompts!r}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
            print("RESULT", json.dumps([o.outputs[0].token_ids for o in outs]))
            llm.engine.shutdown()
        """)
        # Wait until the head answers before the driver joins it.
        deadline = time.monotonic() + 90
        while True:
            status = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{port}"], env=env,
                                    capture_output=True, text=True, timeout=60)
            if status.returncode == 0:
                break
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not come up within 90 s"
            time.sleep(1)
        last = subprocess.run([sys.executable, "-c", client], env=env, capture_output=True, text=True, timeout=240)
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
