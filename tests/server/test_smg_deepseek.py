"""`moelink serve` of a tiny DeepSeek-V3 checkpoint (written by `moelink make-tiny-model --arch deepseek_v3`,
i.e. by transformers' own DeepseekV3ForCausalLM) behind the real smg gateway answers a chat completion with the
offline engine's greedy text."""
from __future__ import annotations

import json

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.tools.tiny_model import make_tiny_model

from tests.helpers.grpc_server import ServerProcess
from tests.helpers.smg_gateway import http_request, launch_smg, wait_models

pytestmark = pytest.mark.slow  # a server subprocess and the gateway

FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "256"]


def test_deepseek_v3_chat_completion_through_smg(tmp_path):
    path = str(make_tiny_model(tmp_path / "dsv3", "deepseek_v3", max_position_embeddings=512))
    messages = [{"role": "user", "content": "What is multi-head latent attention?"}]
    offline = LLM(path, dtype="float32", max_model_len=512, num_kv_blocks=256)
    ids = offline.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref = offline.generate([ids], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    ref = ref[0].outputs[0]
    server = ServerProcess(path, FLAGS + ["--served-model-name", "tiny-deepseek-v3"])
    try:
        with launch_smg(f"grpc://{server.addr}") as (port, proc, log):
            assert wait_models(port, proc, log) == ["tiny-deepseek-v3"]
            body = dict(model="tiny-deepseek-v3", messages=messages, temperature=0.0, max_tokens=16, ignore_eos=True)
            status, raw = http_request(port, "POST", "/v1/chat/completions", body)
        assert status == 200, raw
        out = json.loads(raw)
        text = out["choices"][0]["message"]["content"]
        # smg holds back an incomplete UTF-8 sequence at the end; moelink flushes it as U+FFFD.
        assert text == ref.text or text == ref.text.rstrip("\ufffd"), (text, ref.text)
        assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == len(ref.token_ids)
    finally:
        rc = server.stop()
        logs = server.logs()
        server.close()
    assert rc == 0, f"server exited with {rc}:\n{logs[-4000:]}"
