"""What a vLLM user still tripped on (issue 54, items 3 and 9), against `moelink serve --http-port`.

3. A model given as a local path was served under its folder's name, so a client sending the argument as given
   (`"model": "../models/glm4_moe"`, vLLM's default served name) got `404 No worker available`. Now the argument as
   given is the served name, further --served-model-names are accepted (the first reported), and so is the
   folder's name; smg routes them to the worker's first name (`--model-alias`).
9. vLLM's /tokenize, /detokenize, /version and /ping were 404 and /v1/models had no max_model_len: the front answers
   them now (engine/server/gateway/vllm_routes.py), /tokenize and /detokenize outside the API key as vLLM's middleware
   leaves them, bounded as a completion prompt; and `moelink bench-serve` drives the OpenAI API too.

One server (a relative model path, an API key) serves every HTTP test here; the several-names test uses an
in-process server (no gateway).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import pytest

from moelink.engine.core.tokenizer import Tokenizer
from moelink.engine.server.gateway.options import alias_args

from tests.helpers.grpc_server import ENGINE_FLAGS, ServerProcess, make_stubs
from tests.helpers.net import free_port
from tests.helpers.smg_gateway import http_request, smg_executable

KEY = "sk-vllm-routes"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 512  # ENGINE_FLAGS'


@pytest.fixture(scope="module")
def vllm_server(model_path):
    """(server, HTTP port, the model argument as the server was given it: a relative path with '..')."""
    if smg_executable() is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    rel = os.path.relpath(model_path)  # the server runs in this process's directory
    assert rel.startswith(".."), rel
    port = free_port()
    srv = ServerProcess(rel, ENGINE_FLAGS + ["--api-key", KEY, "--http-port", str(port)])
    try:
        srv.wait_for_line(r"moelink: OpenAI API on http://127\.0\.0\.1:(\d+)/v1", 60, "the OpenAI API line")
        yield srv, port, rel
    finally:
        srv.stop()
        srv.close()


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return Tokenizer.from_dir(model_path)


def _json(port, method, path, body=None, headers=None):
    status, raw = http_request(port, method, path, body, headers)
    return status, json.loads(raw) if raw else None


def _complete(port, model):
    """POST /v1/completions; smg answers 503 `tokenizer_not_ready` for a moment after it lists the model."""
    deadline = time.monotonic() + 30
    while True:
        status, out = _json(port, "POST", "/v1/completions", dict(model=model, prompt="Hello", max_tokens=3), AUTH)
        if status != 503 or time.monotonic() > deadline:
            return status, out
        time.sleep(0.5)


# -- item 3: the served names ----------------------------------------------------------------------------
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_a_local_path_is_served_as_given_and_its_folder_name_too(vllm_server, model_path):
    srv, port, rel = vllm_server
    status, out = _complete(port, rel)
    assert status == 200 and out["model"] == rel, out
    status, out = _complete(port, Path(model_path).name)  # moelink's name before: still accepted, reported as rel
    assert status == 200 and out["model"] == rel, out
    status, out = _complete(port, "no-such-model")
    assert status == 404, out
    with grpc.insecure_channel(srv.addr) as channel:
        stubs, md = make_stubs(channel), (("authorization", f"Bearer {KEY}"),)
        assert stubs.vllm.GetModelInfo(stubs.vpb.GetModelInfoRequest(), timeout=10,
                                       metadata=md).served_model_name == rel
        info = stubs.native.ModelInfo(stubs.pb.ModelInfoRequest(), timeout=10, metadata=md)
        assert info.served_model_name == rel and list(info.served_model_names) == [rel]


def test_v1_models_is_vllms_model_card(vllm_server):
    _, port, rel = vllm_server
    assert _json(port, "GET", "/v1/models")[0] == 401  # under /v1: the key, as before
    status, out = _json(port, "GET", "/v1/models", headers=AUTH)
    assert status == 200 and out["object"] == "list" and [c["id"] for c in out["data"]] == [rel]
    card = out["data"][0]
    assert (card["object"], card["root"], card["parent"], card["max_model_len"]) == ("model", rel, None, MAX_MODEL_LEN)
    perm = card["permission"][0]
    assert perm["object"] == "model_permission" and perm["allow_sampling"] and perm["id"].startswith("modelperm-")


def test_several_served_names_the_first_reported(thread_server, model_path):
    from moelink.engine.server.gateway.vllm_routes import VllmRoutes

    srv = thread_server(served_model_name=["tiny-a", "tiny-b"])
    s = srv.server.serving
    assert s.served_model_names == ("tiny-a", "tiny-b") and s.served_model_name == "tiny-a"
    # Accepted beside them: the model argument as given and its folder's name (smg's --model-alias each).
    assert s.model_aliases == ("tiny-b", model_path, Path(model_path).name)
    assert alias_args(s.served_model_name, s.model_aliases)[:2] == ["--model-alias", "tiny-b=tiny-a"]
    with grpc.insecure_channel(srv.addr) as channel:
        stubs = make_stubs(channel)
        assert stubs.vllm.GetModelInfo(stubs.vpb.GetModelInfoRequest(), timeout=10).served_model_name == "tiny-a"
        info = stubs.native.ModelInfo(stubs.pb.ModelInfoRequest(), timeout=10)
        assert list(info.served_model_names) == ["tiny-a", "tiny-b"]
    routes = VllmRoutes(s)
    assert [c["id"] for c in routes.models()["data"]] == ["tiny-a", "tiny-b"]
    for name in ("tiny-b", Path(model_path).name):
        assert routes.tokenize(dict(model=name, prompt="hi"))["count"] > 0


# -- item 9: vLLM's routes -----------------------------------------------------------------------------
def test_tokenize_and_detokenize_as_vllm_answers_them(vllm_server, tokenizer):
    _, port, rel = vllm_server
    # Outside the key, as vLLM's API-key middleware guards paths under /v1 only.
    status, out = _json(port, "POST", "/tokenize", dict(model=rel, prompt="Hello there", return_token_strs=True))
    ids = tokenizer.encode("Hello there")
    assert status == 200 and out == dict(count=len(ids), max_model_len=MAX_MODEL_LEN, tokens=ids,
                                         token_strs=tokenizer.convert_ids_to_tokens(ids)), out
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text",
                                                                                         "text": "Hi"}]}]
    status, out = _json(port, "POST", "/tokenize", dict(messages=messages))
    want = tokenizer.apply_chat_template([messages[0], {"role": "user", "content": "Hi"}], tokenize=True)
    assert status == 200 and out["tokens"] == want and out["count"] == len(want) and out["token_strs"] is None
    status, out = _json(port, "POST", "/tokenize", dict(messages=messages, add_generation_prompt=False))
    assert status == 200 and out["count"] < len(want)
    status, out = _json(port, "POST", "/detokenize", dict(model=rel, tokens=ids))
    assert status == 200 and out == {"prompt": "Hello there"}
    status, out = _json(port, "POST", "/tokenize", dict(model="gpt-4", prompt="x"))
    assert status == 404 and "does not exist" in out["error"]["message"] and out["error"]["param"] == "model"


@pytest.mark.parametrize("path, body, field", [
    ("/tokenize", dict(prompt="word " * 5000), "prompt"),  # more bytes than 511 tokens can hold: not tokenized
    ("/tokenize", dict(prompt=" 1" * 600), "prompt"),  # within the byte bound, more tokens than max_model_len
    ("/tokenize", dict(messages=[{"role": "user", "content": "word " * 5000}]), "messages"),
    ("/tokenize", dict(prompt="x", temperature=0.5), "temperature"),
    ("/tokenize", dict(prompt="x", chat_template="{{ 1 }}"), "chat_template"),
    ("/tokenize", dict(prompt="x", messages=[{"role": "user", "content": "x"}]), "prompt"),
    ("/tokenize", dict(prompt=[1, 2]), "prompt"),
    ("/tokenize", dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0]"),
    ("/tokenize", dict(messages=[{"role": "user", "content": "x"}], continue_final_message=True), "continue_final_message"),
    ("/detokenize", dict(tokens=[1] * MAX_MODEL_LEN), "tokens"),
    ("/detokenize", dict(tokens=[1, -1]), "tokens[1]"),  # an id past the vocabulary decodes to nothing (below)
    ("/detokenize", dict(tokens=[1, True]), "tokens[1]"),
    ("/detokenize", dict(prompt="x"), "prompt"),
])
def test_a_request_the_engine_would_refuse_is_400_naming_the_field(vllm_server, path, body, field):
    status, out = _json(vllm_server[1], "POST", path, body)
    assert status == 400 and out["error"]["param"] == field, out


def test_version_ping_and_a_wrong_method(vllm_server):
    port = vllm_server[1]
    status, out = _json(port, "GET", "/version")
    assert status == 200 and set(out) == {"version"} and out["version"]
    for method in ("GET", "POST"):  # vLLM's /ping is its /health, both ways
        assert http_request(port, method, "/ping")[0] == 200
    assert http_request(port, "GET", "/tokenize")[0] == 405


def test_the_managed_gateway_starts_without_grpcs_fork_warning(vllm_server):
    """Issue 54 item 10: every start printed `fork_posix.cc:71 Other threads are currently calling into gRPC,
    skipping fork() handlers` (smg was started with a preexec_fn: a fork() while gRPC's threads ran)."""
    logs = vllm_server[0].logs()
    assert "fork_posix" not in logs and "Other threads are currently calling into gRPC" not in logs, logs[-2000:]


@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_bench_serve_drives_the_openai_api(vllm_server, backend, tmp_path, capsys):
    from moelink.engine.api.cli import main

    _, port, rel = vllm_server
    out = tmp_path / "bench.json"
    assert main(["bench-serve", "--backend", backend, "--base-url", f"http://127.0.0.1:{port}/v1", "--api-key", KEY,
                 "--concurrency", "1,2", "--rates", "20", "--num-requests", "4", "--input-len", "12",
                 "--output-len", "5", "--out", str(out), "--no-plot"]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == dict(name=rel, max_model_len=MAX_MODEL_LEN) and result["prompts_cut_by_tokenizer"]
    assert [lv["mode"] for lv in result["levels"]] == ["closed_loop", "closed_loop", "poisson"]
    for lv in result["levels"]:
        assert lv["completed"] == lv["num_requests"] and not lv["errors"], lv
        assert lv["ttft_ms"]["p50"] > 0 and lv["itl_ms"]["p50"] > 0 and lv["tpot_ms"]["p50"] > 0
        assert lv["total_token_throughput"] > lv["output_token_throughput"] > 0
    assert result["config"]["backend"] == backend and "| load |" in capsys.readouterr().out


def test_a_front_before_a_hand_started_smg_answers_what_it_can():
    """`moelink http-front` has no engine: /version here, /ping relayed as smg's GET /health (also for POST),
    /tokenize and /detokenize 404 saying where to ask, none of them behind the key (vLLM's rule)."""
    import asyncio

    from moelink.engine.server.gateway.http_front import HttpFront

    seen: list[bytes] = []

    async def upstream(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n", 1)[0])
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nOK")
        await writer.drain()
        writer.close()

    def requests(port):
        return {(method, path): http_request(port, method, path, {} if method == "POST" else None)
                for method, path in (("GET", "/version"), ("GET", "/ping"), ("POST", "/ping"),
                                     ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/models"))}

    async def scenario():
        up = await asyncio.start_server(upstream, "127.0.0.1", 0)
        front = HttpFront("127.0.0.1", free_port(), up.sockets[0].getsockname()[1], "k3y")
        await front.start()
        try:
            return await asyncio.to_thread(requests, front.port)
        finally:
            await front.stop()
            up.close()

    out = asyncio.run(scenario())
    assert out["GET", "/version"][0] == 200 and "version" in json.loads(out["GET", "/version"][1])
    # Before a gateway started by hand, /ping asks its /health (the managed front answers vLLM's empty 200 itself).
    assert out["GET", "/ping"] == (200, b"OK") and out["POST", "/ping"] == (200, b"OK")
    for path in ("/tokenize", "/detokenize"):
        status, raw = out["POST", path]
        assert status == 404 and b"/v1" + path.encode() in raw, raw
    assert out["GET", "/v1/models"][0] == 401
    assert seen == [b"GET /health HTTP/1.1", b"GET /health HTTP/1.1"]


def test_detokenize_of_an_id_the_vocabulary_lacks_decodes_to_nothing_as_vllms():
    """vLLM 0.32 answers `{"prompt": ""}` (HTTP 200) for /detokenize of [99999999]: its tokenizer skips the id."""
    from types import SimpleNamespace

    from moelink.engine.server.gateway.vllm_routes import VllmRoutes

    decoded = []
    tok = SimpleNamespace(vocab_size=100, decode=lambda ids, skip_special_tokens: decoded.append(ids) or "x" * len(ids))
    routes = VllmRoutes.__new__(VllmRoutes)
    routes.tokenizer, routes.names = tok, frozenset({"m"})
    routes._fits_as_ids = lambda field, n: None
    assert routes.detokenize({"tokens": [99999999, 5, 100]}) == {"prompt": "x"} and decoded == [[5]]
