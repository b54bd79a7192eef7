"""The real `smg` gateway (PyPI `smg`) in front of `moelink serve`: OpenAI HTTP in, VllmEngine gRPC out.

smg applies the chat template and tokenizes itself (from the tokenizer_path our
GetModelInfo names), so matching the offline API here checks the whole path:
template, token ids, sampling parameters, streamed deltas and completion.
"""
from __future__ import annotations

import http.client
import json
import re

import pytest

from moelink.engine import SamplingParams

from tests.helpers.grpc_server import pool_is_free
from tests.helpers.smg_gateway import http_request, launch_smg, wait_models
from tests.helpers.waits import wait_until

def _sse_events(port: int, path: str, body: dict, timeout: float = 30.0):
    """Yields the JSON events of a streamed response (the connection closes when the generator is closed)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)
    finally:
        conn.close()



@pytest.fixture(scope="module")
def gateway(server):
    with launch_smg(f"grpc://{server.addr}") as (port, proc, log):
        wait_models(port, proc, log)
        yield port



def _same_text(got: str, ref: str) -> bool:
    # At the end of a stream smg holds back an incomplete UTF-8 sequence; moelink's
    # detokenizer flushes it as U+FFFD. Token identity is checked separately.
    return got == ref or got == ref.rstrip("\ufffd")


CASES = {
    "greedy": (dict(temperature=0.0, max_tokens=24, ignore_eos=True), dict(temperature=0.0, max_tokens=24, ignore_eos=True)),
    "seeded": (dict(temperature=0.8, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True),
               dict(temperature=0.8, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True)),
}


def test_models_endpoint_names_the_served_model(gateway):
    status, body = http_request(gateway, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["tiny-moe"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_completions_match_offline(gateway, offline, stream, case):
    http_params, params = CASES[case]
    prompt = "Once upon a time"
    ref = offline.generate(prompt, SamplingParams(**params), use_tqdm=False)[0]
    body = dict(model="tiny-moe", prompt=prompt, stream=stream, **http_params)
    if not stream:
        status, raw = http_request(gateway, "POST", "/v1/completions", body)
        assert status == 200, raw
        out = json.loads(raw)
        text, finish, usage = out["choices"][0]["text"], out["choices"][0]["finish_reason"], out["usage"]
    else:
        body["stream_options"] = {"include_usage": True}
        events = list(_sse_events(gateway, "/v1/completions", body))
        text = "".join(c["text"] for e in events for c in e["choices"])
        finish = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")][-1]
        usage = [e["usage"] for e in events if e.get("usage")][-1]
    assert _same_text(text, ref.outputs[0].text), (text, ref.outputs[0].text)
    assert finish == "length"
    assert usage["completion_tokens"] == len(ref.outputs[0].token_ids)
    assert usage["prompt_tokens"] == len(ref.prompt_token_ids)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_chat_completions_match_offline(gateway, offline, stream, case):
    http_params, params = CASES[case]
    messages = [{"role": "user", "content": "Tell me about mixtures of experts."}]
    ids = offline.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref = offline.generate([ids], SamplingParams(logprobs=0, **params), use_tqdm=False)[0].outputs[0]
    body = dict(model="tiny-moe", messages=messages, stream=stream, logprobs=True, **http_params)
    if not stream:
        status, raw = http_request(gateway, "POST", "/v1/chat/completions", body)
        assert status == 200, raw
        out = json.loads(raw)
        text, usage = out["choices"][0]["message"]["content"], out["usage"]
        lps = out["choices"][0]["logprobs"]["content"]
    else:
        body["stream_options"] = {"include_usage": True}
        events = list(_sse_events(gateway, "/v1/chat/completions", body))
        text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
        usage = [e["usage"] for e in events if e.get("usage")][-1]
        lps = None  # smg drops the logprobs of chunks whose text it holds back
    assert _same_text(text, ref.text), (text, ref.text)
    assert usage["prompt_tokens"] == len(ids)
    assert usage["completion_tokens"] == len(ref.token_ids)
    # Token by token: the logprob of each generated token, as the engine computed it.
    if lps is not None:
        want = [ref.logprobs[i][t].logprob for i, t in enumerate(ref.token_ids)]
        assert [lp["logprob"] for lp in lps] == pytest.approx(want, abs=1e-4)


def test_generate_endpoint_returns_the_offline_token_ids(gateway, offline):
    """smg's SGLang-style /generate shows the token ids themselves (greedy: /generate takes no seed)."""
    _, params = CASES["greedy"]
    ids = [7, 77, 177, 277]
    ref = offline.generate([ids], SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    sp = dict(max_new_tokens=params["max_tokens"], temperature=0.0, ignore_eos=True)
    status, raw = http_request(gateway, "POST", "/generate", dict(model="tiny-moe", input_ids=ids, sampling_params=sp))
    assert status == 200, raw
    out = json.loads(raw)
    out = out[0] if isinstance(out, list) else out
    assert out["output_ids"] == ref.token_ids


def test_closing_the_http_stream_aborts_in_moelink(gateway, stubs):
    pb = stubs.pb
    body = dict(model="tiny-moe", prompt="a long story", stream=True, max_tokens=480, ignore_eos=True, temperature=0)
    events = _sse_events(gateway, "/v1/completions", body)
    for _ in range(3):
        next(events)
    running = stubs.native.ServerInfo(pb.ServerInfoRequest(), timeout=5)
    assert running.active_requests == 1 and running.num_running == 1
    events.close()  # closes the HTTP connection mid-stream
    info = wait_until(lambda: pool_is_free(stubs.native, pb), 10, "moelink to abort the request smg closed",
                      detail=lambda: str(stubs.native.ServerInfo(pb.ServerInfoRequest())))
    assert info, f"request still running in moelink: {stubs.native.ServerInfo(pb.ServerInfoRequest())}"
    assert info.generated_tokens_total < running.generated_tokens_total + 480


# -- structured output through the OpenAI API (smg maps response_format / regex / choice to the constraint oneof) --
PET_SCHEMA = {"type": "object", "properties": {"pet": {"type": "string", "enum": ["cat", "dog", "emu"]},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 30}},
              "required": ["pet", "age"], "additionalProperties": False}


def test_chat_response_format_json_schema_validates(gateway):
    jsonschema = pytest.importorskip("jsonschema")
    messages = [{"role": "user", "content": "Describe a pet as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA}}
    for seed in range(20):
        status, raw = http_request(gateway, "POST", "/v1/chat/completions", dict(
            model="tiny-moe", messages=messages, temperature=1.0, seed=seed, max_tokens=48, response_format=fmt))
        assert status == 200, raw
        choice = json.loads(raw)["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), PET_SCHEMA)


def test_completions_regex_ebnf_and_chat_json_object(gateway):
    # smg's OpenAI API takes SGLang's top-level `regex` and `ebnf` (it drops vLLM's `choice`; the managed gateway's
    # front carries it: tests/server/test_http_front.py; over gRPC: tests/server/test_structured_output_grpc.py).
    for seed in range(4):
        for extra, pattern in [(dict(regex=r"[a-z]{3}-[0-9]{2}"), r"[a-z]{3}-[0-9]{2}"),
                               (dict(ebnf='root ::= ("yes" | "no") "!"'), r"(yes|no)!")]:
            status, raw = http_request(gateway, "POST", "/v1/completions", dict(
                model="tiny-moe", prompt="Go", temperature=1.0, seed=seed, max_tokens=16, **extra))
            assert status == 200, raw
            text = json.loads(raw)["choices"][0]["text"]
            assert re.fullmatch(pattern, text), (extra, text)
    status, raw = http_request(gateway, "POST", "/v1/chat/completions", dict(
        model="tiny-moe", messages=[{"role": "user", "content": "JSON please"}], temperature=1.0, seed=3,
        max_tokens=48, response_format={"type": "json_object"}))
    assert status == 200, raw
    out = json.loads(raw)["choices"][0]
    if out["finish_reason"] == "stop":
        assert isinstance(json.loads(out["message"]["content"]), dict)


def test_invalid_schema_is_http_400_naming_the_field(gateway):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                        "properties": {"a": {"type": "nope"}}}}}
    status, raw = http_request(gateway, "POST", "/v1/chat/completions", dict(
        model="tiny-moe", messages=[{"role": "user", "content": "hi"}], max_tokens=8, response_format=bad))
    assert status == 400, (status, raw)
    assert b"json_schema" in raw, raw


def test_max_tokens_beyond_the_context_is_http_400_with_the_numbers(gateway):
    """vLLM's answer to prompt + max_tokens > max_model_len: 400 naming max_tokens, the context and the prompt's
    tokens (it was clamped in silence). Leaving max_tokens out still runs up to the context."""
    for path, body in [("/v1/completions", dict(prompt="Once upon a time")),
                       ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "Hello"}]))]:
        status, raw = http_request(gateway, "POST", path, dict(model="tiny-moe", max_tokens=600, **body))
        assert status == 400, (path, status, raw)
        message = json.loads(raw)["error"]["message"]
        assert "sampling_params.max_tokens=600 is too large" in message, message
        assert "maximum context length is 512 tokens" in message and re.search(r"has \d+ tokens \(600 > 512 - \d+\)",
                                                                                 message), message
    status, raw = http_request(gateway, "POST", "/v1/completions", dict(
        model="tiny-moe", prompt="Once upon a time", temperature=0, ignore_eos=True))
    assert status == 200, raw
    usage = json.loads(raw)["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 512, usage


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "smg 1.13's /v1/completions builds each choice with logprobs None (streamed or not; its source marks it TODO) "
    "although moelink's VllmEngine answer carries them (tests/server/test_managed_gateway.py proves both sides). "
    "An XPASS means smg passes them on now: drop this marker and docs/serving.md's note."))
def test_completions_logprobs_through_smg(gateway, offline):
    prompt = "Once upon a time"
    ref = offline.generate(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=2),
                           use_tqdm=False)[0].outputs[0]
    status, raw = http_request(gateway, "POST", "/v1/completions", dict(
        model="tiny-moe", prompt=prompt, max_tokens=4, temperature=0, ignore_eos=True, logprobs=2))
    if status != 200:  # not the AssertionError this xfail expects: a broken request must fail the test
        raise RuntimeError(f"HTTP {status}: {raw[:500]!r}")
    lps = json.loads(raw)["choices"][0].get("logprobs")  # smg leaves the key out when it is None
    assert lps is not None, "smg dropped the completions logprobs"
    want = [ref.logprobs[i][t].logprob for i, t in enumerate(ref.token_ids)]
    assert lps["token_logprobs"] == pytest.approx(want, abs=1e-4)
