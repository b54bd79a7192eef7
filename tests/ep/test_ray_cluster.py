"""Join a real Ray head started with `ray start --head` on 127.0.0.1, by its explicit address.

Not address="auto": that reads machine-wide state (/tmp/ray/ray_current_cluster), which names whatever
Ray started last on this machine, and made this test join another instance and time out. The head also
keeps its files in a temp dir of its own (tests.helpers.local_ray.RayHead), never in /tmp/ray."""
from __future__ import annotations

import json
import os
import secrets
import sys
import textwrap

import pytest

from moelink.engine import LLM, SamplingParams

from tests.helpers import zygote
from tests.helpers.local_ray import RAY, RayHead

pytestmark = pytest.mark.slow


@pytest.mark.skipif(RAY is None, reason="the `ray` command is not installed")
def test_generate_on_ray_head_started_by_ray_start(tiny_model, tmp_path):
    path = tiny_model("mixtral_e5k3")
    prompts = [[3, 4, 5, 6], [7] * 40, [9, 10]]
    want = [o.outputs[0].token_ids for o in LLM(path, dtype="float64").generate(
        prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)]

    # Ray's token auth, as deploy/ray documents it: one shared secret for the head and every driver.
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", MOELINK_MASTER_ADDR="127.0.0.1",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # Waits until the head answers (`ray status --address`, 90 s) before the driver joins it.
    with RayHead(tmp_path / "head.log", env, num_cpus=4) as head:
        client = textwrap.dedent(f"""
            import json
            from moelink.engine import LLM, SamplingParams
            llm = LLM({path!r}, dtype="float64", expert_parallel_size=2, ray_address={head.address!r})
            outs = llm.generate({prompts!r}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
            print("RESULT", json.dumps([o.outputs[0].token_ids for o in outs]))
            llm.engine.shutdown()
        """)
        # The driver is a process of its own (forked by the test zygote: torch imported once, tests/helpers/zygote.py).
        last = zygote.run([sys.executable, "-c", client], env=env, capture_output=True, text=True, timeout=240,
                          fork_code=True)
        assert last.returncode == 0, last.stderr[-3000:]
        line = next(ln for ln in last.stdout.splitlines() if ln.startswith("RESULT "))
        assert json.loads(line[len("RESULT "):]) == want
