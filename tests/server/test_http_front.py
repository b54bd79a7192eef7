"""vLLM's structured-output request fields over HTTP (issue 27, item 3).

smg 1.13 drops `guided_choice` and `structured_outputs` before it calls the worker (it forwards
`response_format`, completions' `json_schema`, `regex` and `ebnf` only), so a choice came back as free text
with HTTP 200. `moelink serve --http-port` puts its front (engine/server/gateway/http_front.py) before smg, which
carries them in the fields smg forwards, or answers 400 naming the field. Against the real smg here; the
rewrite itself is unit-tested without a server.
"""
from __future__ import annotations

import http.client
import json

import pytest

from moelink.engine.server.gateway.openai_fields import HttpFieldError, rewrite

from tests.helpers.net import free_port
from tests.helpers.net import free_port
from tests.helpers.smg_gateway import http_request

SERVED = "tiny-moe"
# The longest choice is 10 characters: max_tokens below leaves room for it spelled a byte at a time (at 8 the stream
# was cut inside it when the sampler chose it: 'up "north').
CHOICES = ["left", "right", 'up "north"']
MESSAGES = [{"role": "user", "content": "Which way?"}]
pytestmark = pytest.mark.xdist_group("openai_server")  # one worker starts `openai_server` (tests/server/conftest.py)


@pytest.fixture
def http_port(openai_server):
    return openai_server[1]


def _post(port, path, **body):
    base = dict(messages=MESSAGES) if path == "/v1/chat/completions" else dict(prompt="Which way?")
    request = dict(model=SERVED, max_tokens=16, temperature=1.0, **base)
    status, raw = http_request(port, "POST", path, {**request, **body})
    out = json.loads(raw)
    if status != 200:
        return status, out
    choice = out["choices"][0]
    return status, choice["message"]["content"] if "message" in choice else choice["text"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("field", ["guided_choice", "structured_outputs"])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_choice_over_http_is_enforced(http_port, path, field):
    value = CHOICES if field == "guided_choice" else {"choice": CHOICES}
    for seed in range(4):
        status, text = _post(http_port, path, seed=seed, **{field: value})
        assert status == 200 and text in CHOICES, (status, text)


def test_the_rl_control_routes_answer_from_the_engine_on_moelink_serve(http_port):
    """`moelink serve`'s front answers the RL routes itself (rl_routes.py), beside the tokenizer and LoRA routes:
    the version read, a weight-changing call refused naming the flag this server was started without."""
    assert http_request(http_port, "GET", "/get_weight_version") == (200, b'{"weight_version": null}')
    for path, body in (("/pause_generation", {"mode": "wait"}), ("/flush_cache", None)):
        status, raw = http_request(http_port, "POST", path, body)
        assert status == 403 and "--enable-weight-updates" in json.loads(raw)["message"], (path, raw)
    # SGLang's /generate too (generate_route.py; its checks: test_generate_route.py), never smg's own
    status, raw = http_request(http_port, "POST", "/generate", {"input_ids": [5, 17, 99], "sampling_params": {
        "max_new_tokens": 3, "temperature": 0, "ignore_eos": True}, "return_logprob": True})
    out = json.loads(raw)
    assert status == 200 and len(out["output_ids"]) == 3 and out["meta_info"]["finish_reason"]["type"] == "length"
    assert [t for _, t, _ in out["meta_info"]["output_token_logprobs"]] == out["output_ids"]


@pytest.mark.slow  # an smg of its own (about 2 s)
def test_smgs_rl_control_plane_fans_its_calls_out_to_the_front(http_port):
    """smg's RL control plane (`smg launch --enable-rl`) with `moelink serve`'s front registered as an HTTP worker:
    smg lists it (as a vLLM engine) and its fan-out (`/v1/rl/engine/{path}?selector=...`) reaches the front's RL
    routes: the reads answered, a weight-changing call the worker's own 403 naming the flag."""
    from tests.helpers.smg_gateway import launch_smg_with

    with launch_smg_with("--enable-rl", "--worker-urls", f"http://127.0.0.1:{http_port}") as (port, proc, log):
        def fan_out(method: str, path: str, body=None) -> tuple[int, dict]:
            status, raw = http_request(port, method, f"/v1/rl/engine/{path}?selector=served_model_name%3D{SERVED}",
                                       body)
            return status, json.loads(raw)

        for _ in range(100):  # smg registers the worker after it starts (another process): polled, bounded
            assert proc.poll() is None, open(log).read()[-3000:]
            try:
                status, raw = http_request(port, "GET", "/v1/rl/workers")
            except OSError:
                status, raw = 0, b"{}"
            workers = json.loads(raw).get("workers") if status == 200 else None
            if workers and workers[0]["health"] == "ready":
                break
            __import__("time").sleep(0.2)
        assert [(w["engine"], w["labels"]["served_model_name"]) for w in workers] == [("vllm", SERVED)]
        for path, want in (("get_weight_version", {"weight_version": None}), ("is_paused", {"is_paused": False}),
                           ("is_sleeping", {"is_sleeping": False})):
            status, out = fan_out("GET", path)
            assert status == 200 and out["succeeded"] == 1, out
            assert [r["body"] for r in out["results"].values()] == [want]
        status, out = fan_out("POST", "pause", {"mode": "wait", "clear_cache": False})
        assert out["succeeded"] == 0 and [r["status"] for r in out["results"].values()] == [403], out
        assert "--enable-weight-updates" in json.dumps(out)


def test_regex_grammar_and_json_through_structured_outputs(http_port):
    status, text = _post(http_port, "/v1/completions", seed=1, structured_outputs={"regex": "[a-c]{3}-[0-9]"})
    assert status == 200 and len(text) == 5 and text[3] == "-", text
    grammar = {"grammar": 'root ::= "y" | "n"'}
    status, text = _post(http_port, "/v1/chat/completions", seed=2, structured_outputs=grammar)
    assert status == 200 and text in ("y", "n"), text
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    for path in ("/v1/chat/completions", "/v1/completions"):
        status, text = _post(http_port, path, seed=3, max_tokens=24, guided_json=schema)
        assert status == 200 and 0 <= json.loads(text)["n"] <= 9, text


@pytest.mark.parametrize("body, field", [
    (dict(structured_outputs={"structural_tag": "{}"}), "structured_outputs.structural_tag"),
    (dict(guided_choice=[]), "guided_choice"),
    (dict(structured_outputs={"choice": ["a"]}, regex="b"), "structured_outputs.choice"),
    (dict(structured_outputs="choice"), "structured_outputs"),
])
def test_a_field_that_cannot_be_carried_is_http_400_naming_it(http_port, body, field):
    status, out = _post(http_port, "/v1/chat/completions", **body)
    assert status == 400 and out["error"]["param"] == field and field in out["error"]["message"], out


def test_the_front_relays_streams_and_other_paths(http_port):
    status, raw = http_request(http_port, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(raw)["data"]] == [SERVED]
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(dict(
            model=SERVED, prompt="Which way?", stream=True, max_tokens=24, guided_choice=CHOICES)),
            headers={"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("connection") == "close"
        events = [json.loads(line[5:]) for line in resp.read().decode().splitlines()
                  if line.startswith("data:") and line != "data: [DONE]"]
    finally:
        conn.close()
    assert "".join(c["text"] for e in events for c in e["choices"]) in CHOICES


# -- the rewrite (no server) --
def test_rewrite_carries_each_kind_in_a_field_smg_forwards():
    chat, completions = "/v1/chat/completions", "/v1/completions"
    assert rewrite(chat, {"messages": []}) is None
    assert rewrite(chat, {"guided_choice": ["a", 'b"']})["ebnf"] == 'root ::= "a" | "b\\""'
    assert rewrite(completions, {"structured_outputs": {"regex": "x+"}}) == {"regex": "x+"}
    assert rewrite(chat, {"guided_grammar": 'root ::= "a"'}) == {"ebnf": 'root ::= "a"'}
    schema = {"type": "object"}
    assert rewrite(chat, {"structured_outputs": {"json": schema}})["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "structured_outputs", "schema": schema}}
    assert rewrite(completions, {"guided_json": json.dumps(schema)}) == {"json_schema": json.dumps(schema)}
    assert rewrite(chat, {"structured_outputs": {"json_object": True}}) == {"response_format": {"type": "json_object"}}
    # A text response_format constrains nothing, so it may stand beside a choice.
    assert "ebnf" in rewrite(chat, {"guided_choice": ["a"], "response_format": {"type": "text"}})
    with pytest.raises(HttpFieldError, match="guided_regex and ebnf are both set") as e:
        rewrite(chat, {"guided_regex": "a", "ebnf": 'root ::= "a"'})
    assert e.value.field == "guided_regex"


def test_the_front_answers_503_while_smg_is_down():
    """Between smg's death and its restart by the supervisor, a request gets a 503 it can retry, not a reset (the
    supervisor's reason; without a restart under way it is a 502: tests/server/test_gateway_restart_503.py)."""
    import asyncio

    from moelink.engine.server.gateway.http_front import HttpFront

    restarting = "the OpenAI gateway (smg) is not running; it is being restarted (1 crashes so far); gRPC still serves."

    async def scenario():
        front = HttpFront("127.0.0.1", free_port(), free_port(),  # nothing listens upstream
                          not_serving=lambda: restarting)
        await front.start()
        try:
            return await asyncio.to_thread(http_request, front.port, "GET", "/v1/models")
        finally:
            await front.stop()

    status, raw = asyncio.run(scenario())
    assert status == 503 and b"it is being restarted" in raw, raw


# -- issue 32 item 8: smg drops logit_bias, and it was answered as if unset ----------------------------------------
def test_logit_bias_is_refused_naming_the_field_not_ignored():
    for path in ("/v1/chat/completions", "/v1/completions"):
        with pytest.raises(HttpFieldError, match=r"^logit_bias=.* is not supported") as e:
            rewrite(path, {"model": SERVED, "logit_bias": {"50256": -100}})
        assert e.value.field == "logit_bias"
        assert rewrite(path, {"model": SERVED, "logit_bias": {}}) is None  # nothing to apply: passed on
        assert rewrite(path, {"model": SERVED, "logit_bias": None}) is None


def test_prompt_logprobs_are_refused_naming_the_field_not_ignored():
    # smg 1.13 answers without them (tried: the completion comes back with no prompt_logprobs); gRPC returns them.
    for path in ("/v1/chat/completions", "/v1/completions"):
        with pytest.raises(HttpFieldError, match=r"^prompt_logprobs=1 is not supported over HTTP") as e:
            rewrite(path, {"model": SERVED, "prompt_logprobs": 1})
        assert e.value.field == "prompt_logprobs"
        assert rewrite(path, {"model": SERVED, "prompt_logprobs": None}) is None


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_logit_bias_is_applied_by_the_front_and_refused_where_smg_would_drop_it(http_port):
    # the front's chat and completions routes apply it (issue 79; its effect: tests/server/test_completions_route.py)
    assert _post(http_port, "/v1/chat/completions", logit_bias={"7": 100})[0] == 200
    assert _post(http_port, "/v1/completions", logit_bias={"7": 100})[0] == 200
    # relayed to smg (a field only smg carries beside it), which would drop it: refused naming it
    status, out = _post(http_port, "/v1/chat/completions", logit_bias={"7": 100}, guided_choice=CHOICES)
    assert status == 400 and out["error"]["param"] == "logit_bias", out
    # completions' prompt logprobs are answered from the engine (completions_route.py); relayed to smg (a field only
    # smg carries beside them) they are still refused, smg would drop them
    assert _post(http_port, "/v1/completions", prompt_logprobs=1)[0] == 200
    status, out = _post(http_port, "/v1/completions", prompt_logprobs=1, guided_choice=CHOICES)
    assert status == 400 and out["error"]["param"] == "prompt_logprobs", out
    status, _ = _post(http_port, "/v1/completions", logit_bias={})
    assert status == 200


# -- issue 53 low 2: GET /v1/models answered without the API key (smg asks it of generation routes only) -----------
def _front_with_key(api_key, requests):
    """`requests(front_port)` on a thread against a front with `api_key` before an upstream that answers 200 and
    records each request line; (its result, the request lines the upstream saw)."""
    import asyncio

    from moelink.engine.server.gateway.http_front import HttpFront

    seen: list[bytes] = []

    async def upstream(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n", 1)[0])
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    async def scenario():
        up = await asyncio.start_server(upstream, "127.0.0.1", 0)
        front = HttpFront("127.0.0.1", free_port(), up.sockets[0].getsockname()[1], api_key)
        await front.start()
        try:
            return await asyncio.to_thread(requests, front.port)
        finally:
            await front.stop()
            up.close()

    return asyncio.run(scenario()), seen


def test_with_an_api_key_every_v1_path_asks_it_and_the_probes_do_not():
    key = {"authorization": "Bearer k3y"}

    def requests(port):
        out = {}
        for path in ("/v1/models", "/v1/models/tiny-moe", "/v1beta/interactions", "/v1/tokenize"):
            for name, headers in (("none", None), ("wrong", {"authorization": "Bearer nope"}),
                                  ("x-api-key", {"x-api-key": "k3y"}), ("key", key)):
                out[path, name] = http_request(port, "GET", path, headers=headers)
        # A field the front would refuse with 400 is not looked at without the key: 401 first.
        out["chat"] = http_request(port, "POST", "/v1/chat/completions", {"model": "m", "guided_choice": []})
        out["health"] = http_request(port, "GET", "/health")
        out["liveness"] = http_request(port, "GET", "/liveness")
        return out

    out, seen = _front_with_key("k3y", requests)
    for (path, name), (status, raw) in ((k, v) for k, v in out.items() if isinstance(k, tuple)):
        if name == "key":
            assert status == 200, (path, raw)
        else:
            assert status == 401 and raw == b'{"error":"Unauthorized"}', (path, name, raw)  # vLLM's body
    assert out["chat"][0] == 401
    assert out["health"][0] == 200 and out["liveness"][0] == 200
    # Only the keyed requests and the probes reached smg.
    assert sorted(seen) == sorted([b"GET %s HTTP/1.1" % p.encode() for p in ("/v1/models", "/v1/models/tiny-moe",
                                                                            "/v1beta/interactions", "/v1/tokenize",
                                                                            "/health", "/liveness")])


def test_without_an_api_key_v1_paths_are_relayed_as_before():
    out, seen = _front_with_key(None, lambda port: http_request(port, "GET", "/v1/models"))
    assert out[0] == 200 and seen == [b"GET /v1/models HTTP/1.1"]


# -- smg 1.13 answers 503 `tokenizer_not_ready` for a moment after it lists the model (quirks.MODELS_BEFORE_TOKENIZER)
def _front_before(answers):
    """A front before an upstream that answers each request with the next of `answers` (the last one repeats);
    (the client's (status, body) of one POST, the bodies the upstream saw)."""
    import asyncio

    from moelink.engine.server.gateway.http_front import HttpFront

    seen: list[bytes] = []

    async def upstream(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.startswith(b"content-length")))
        seen.append(await reader.readexactly(length))
        status, body = answers[min(len(seen), len(answers)) - 1]
        writer.write(b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body))
        await writer.drain()
        writer.close()

    async def scenario():
        up = await asyncio.start_server(upstream, "127.0.0.1", 0)
        front = HttpFront("127.0.0.1", free_port(), up.sockets[0].getsockname()[1])
        await front.start()
        try:
            return await asyncio.to_thread(http_request, front.port, "POST", "/v1/completions",
                                           {"model": "m", "prompt": "hi", "max_tokens": 2})
        finally:
            await front.stop()
            up.close()

    return asyncio.run(scenario()), seen


def test_a_503_tokenizer_not_ready_is_sent_again_not_handed_to_the_client():
    not_ready = (503, b'{"error": {"code": "tokenizer_not_ready", "message": "Tokenizer not yet registered"}}')
    (status, raw), seen = _front_before([not_ready, not_ready, (200, b'{"ok": 1}')])
    assert status == 200 and json.loads(raw) == {"ok": 1}
    assert len(seen) == 3 and len(set(seen)) == 1 and json.loads(seen[0])["prompt"] == "hi"  # the same request again


def test_any_other_503_reaches_the_client_as_smg_said_it():
    other = (503, b'{"error": {"message": "no worker"}}')
    (status, raw), seen = _front_before([other, (200, b"{}")])
    assert status == 503 and b"no worker" in raw and len(seen) == 1
