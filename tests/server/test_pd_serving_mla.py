"""Prefill/decode disaggregation of an MLA model served over NIXL: a tiny DeepSeek-V3 (written by transformers'
own DeepseekV3ForCausalLM) as `moelink serve --role prefill` and `--role decode` processes on 127.0.0.1 with
`--kv-transport nixl` (in place: the prefill's cache registered once, the decode reading the held blocks straight
into its own), behind the real smg gateway's PD mode. tests/server/test_pd_serving.py does the same for GQA (the
default transport is NIXL where it is installed) with the faults; this is the latent's path end to end.

Checked: completions through smg equal one engine's greedy text, streamed and not; the decode server loaded every
prompt token but the last (cached_tokens = prompt - 1, from its own request line, since smg 1.13 reports the
prefill leg's usage); a stream the client cuts mid-way leaves both servers idle with every KV block free."""
from __future__ import annotations

import http.client
import json

import grpc
import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.nixl import nixl_available
from moelink.engine.tools.tiny_model import make_tiny_model

from tests.helpers.grpc_server import ServerProcess, make_stubs
from tests.helpers.net import free_port
from tests.helpers.smg_gateway import completion_text, launch_smg_pd, smg_executable, sse_events, wait_models
from tests.helpers.waits import wait_until

pytestmark = pytest.mark.slow  # two server processes and the gateway

FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "256", "--served-model-name", "tiny-dsv3"]
GREEDY = dict(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def mla_pd(tmp_path_factory):
    """(model path, prefill server, decode server, prefill stubs, decode stubs, smg's port)."""
    if smg_executable() is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    if not nixl_available():
        pytest.skip("NIXL (PyPI nixl-cu12) is not installed")
    path = str(make_tiny_model(tmp_path_factory.mktemp("dsv3_pd") / "dsv3", "deepseek_v3",
                               max_position_embeddings=512))
    pre = ServerProcess(path, FLAGS + ["--role", "prefill", "--kv-port", str(free_port()), "--kv-transport", "nixl"])
    dec = ServerProcess(path, FLAGS + ["--role", "decode", "--kv-transport", "nixl"])
    chans = [grpc.insecure_channel(s.addr) for s in (pre, dec)]
    try:
        with launch_smg_pd(pre.addr, dec.addr, path) as (port, proc, log_name):
            wait_models(port, proc, log_name)
            yield path, pre, dec, make_stubs(chans[0]), make_stubs(chans[1]), port
    finally:
        for ch in chans:
            ch.close()
        for srv in (pre, dec):
            rc = srv.stop()
            logs = srv.logs()
            srv.close()
            assert rc == 0, f"server exited with {rc}:\n{logs[-3000:]}"


@pytest.fixture(scope="module")
def offline(mla_pd):
    return LLM(mla_pd[0], dtype="float32", max_model_len=512, num_kv_blocks=256)


def _idle(stubs) -> bool:
    loads = stubs.vllm.GetLoads(stubs.vpb.GetLoadsRequest(), timeout=10).loads
    return all(x.num_running_reqs == 0 and x.num_waiting_reqs == 0 and x.num_used_tokens == 0 for x in loads)


@pytest.mark.parametrize("stream", [False, True])
def test_mla_pd_over_nixl_through_smg_matches_one_engine(mla_pd, offline, stream):
    _, pre, dec, _, _, port = mla_pd
    prompt = "Multi-head latent attention caches one latent per token, " * 3
    want = offline.generate(prompt, SamplingParams(**GREEDY), use_tqdm=False)[0]
    text, events = completion_text(port, dict(model="tiny-dsv3", prompt=prompt, stream=stream, **GREEDY))
    assert len(events) > 1 or not stream
    # smg holds back an incomplete UTF-8 sequence at the end; moelink flushes it as U+FFFD.
    assert text == want.outputs[0].text or text == want.outputs[0].text.rstrip("\ufffd")
    # smg (1.13) reports the prefill leg's usage; the decode server's own request line says what it loaded.
    n = len(want.prompt_token_ids)
    assert f"cached_tokens={n - 1}" in dec.finished_line(n)
    said = "".join(pre.stdout_lines)
    assert "moelink: KV nixl: serves saved KV on 127.0.0.1:" in said, said


def test_mla_pd_stream_cut_mid_way_leaves_both_servers_idle(mla_pd):
    _, _, _, pre_stubs, dec_stubs, port = mla_pd
    body = dict(model="tiny-dsv3", prompt="a long story about experts " * 6, stream=True, max_tokens=300,
                ignore_eos=True, temperature=0.0)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert len(sse_events(resp, stop_after=3)) == 3
    finally:
        conn.close()  # the client goes away with the stream open
    wait_until(lambda: _idle(pre_stubs) and _idle(dec_stubs), 60.0, "both servers idle with every KV block free",
               interval=0.2)
