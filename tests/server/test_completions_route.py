"""vLLM's `POST /v1/completions` answered by `moelink serve`'s HTTP front from the engine beside it
(engine/server/gateway/completions_route.py; docs/vllm-compat.md#v1completions; issue 79 items 1 and 2).

smg 1.13 answered completions without logprobs, echo and prompt logprobs, and refused token-id prompts; lm-eval's
`local-completions` sends exactly those. Against the shared `moelink serve --http-port` (tests/server/conftest.py
`openai_server`, no process of this file's own): the tokens the Python API gives, echo's prompt entries the engine's
prompt logprobs, streams that add up to the whole answer, n samples, refusals naming the field, the OpenAI client
parsing it. The answer's builder is unit-tested first, without a server."""
from __future__ import annotations

import http.client
import json
import socket
import time
from types import SimpleNamespace

import pytest

from moelink.engine import SamplingParams
from moelink.engine.core.outputs import CompletionOutput, Logprob, RequestOutput
from moelink.engine.server.gateway.completions_answer import CompletionAnswer, completion_logprobs
from moelink.engine.server.gateway.completions_request import claims, read_request, unknown_field
from moelink.engine.server.gateway.openai_fields import HttpFieldError
from moelink.engine.server.limits import RequestLimits

from tests.helpers.smg_gateway import http_request, sse_events

SERVED = "tiny-moe"
PROMPT = "The quick brown fox jumps over"
pytestmark = pytest.mark.xdist_group("openai_server")  # one worker starts `openai_server` (tests/server/conftest.py)

# -- the answer's builder, without a server -------------------------------------------------------------------------

_SERVING = SimpleNamespace(limits=RequestLimits(), request_id=lambda rid: rid, info=SimpleNamespace(sampling_defaults={}))
_TEXTS = {1: "A", 2: " b", 3: "c", 4: "dd", 5: "<s>"}


def _decode_one(t: int) -> str:
    return _TEXTS.get(t, f"<{t}>")


def _request(**body):
    return read_request({"prompt": [5, 1, 2], **body}, _SERVING, None, "x")


def _out(ids, lps, text, finish=None, prompt_lps=None, prompt_ids=(5, 1, 2)):
    comp = CompletionOutput(0, text, list(ids), None, lps, finish, None)
    return RequestOutput("r", None, list(prompt_ids), [comp], finish is not None, prompt_logprobs=prompt_lps)


_PROMPT_LPS = [None, {1: Logprob(-1.5, 2, "A"), 4: Logprob(-0.5, 1, "dd")}, {2: Logprob(-0.25, 1, " b")}]
_GEN_LPS = [{3: Logprob(-0.125, 1, "c"), 1: Logprob(-3.0, 2, "A")}]


def test_logprobs_object_in_vllms_shape():
    """vLLM's CompletionLogProbs: the token's own text, the token first in its top entry, then the rest by rank;
    text_offset the running sum of the token texts; a position without logprobs null; -inf clamped to -9999.0."""
    entries = [None, {4: Logprob(-0.5, 1, "dd"), 1: Logprob(float("-inf"), 2, "A")}]
    got = completion_logprobs([5, 1], entries, _decode_one, offset=7)
    assert got == {"text_offset": [7, 10], "token_logprobs": [None, -9999.0], "tokens": ["<s>", "A"],
                   "top_logprobs": [None, {"A": -9999.0, "dd": -0.5}]}
    assert list(got["top_logprobs"][1]) == ["A", "dd"]  # the token itself first (vLLM's order)


def test_echo_with_logprobs_puts_the_prompt_first_and_max_tokens_0_answers_the_prompt_alone():
    req = _request(echo=True, logprobs=1, max_tokens=1)
    assert req.params.prompt_logprobs == 1 and req.params.logprobs == 1  # echo asks the prompt's, as vLLM does
    ans = CompletionAnswer(req, SERVED, 0, _decode_one, lambda ids: "".join(map(_decode_one, ids)))
    ans.add(0, 0, _out([3], _GEN_LPS, "c", "length", _PROMPT_LPS))
    body = ans.body()
    choice = body["choices"][0]
    assert choice["text"] == "<s>A bc" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["<s>", "A", " b", "c"] and lp["text_offset"] == [0, 3, 4, 6]
    assert lp["token_logprobs"] == [None, -1.5, -0.25, -0.125] and lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][1] == {"A": -1.5, "dd": -0.5}
    assert choice["prompt_logprobs"][1] == {"1": {"logprob": -1.5, "rank": 2, "decoded_token": "A"},
                                            "4": {"logprob": -0.5, "rank": 1, "decoded_token": "dd"}}
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1,
                             "prompt_tokens_details": None, "completion_tokens_details": None}
    # vLLM 0.32's fields filled only under flags moelink does not serve: null, as vLLM answers them
    assert (body["ec_transfer_params"], body["metrics"], choice["routed_experts"]) == (None, None, None)
    assert body["object"] == "text_completion" and body["id"] == "cmpl-x" and body["model"] == SERVED

    zero = _request(echo=True, logprobs=0, max_tokens=0)
    assert zero.prompt_only and zero.params.max_tokens == 1
    ans = CompletionAnswer(zero, SERVED, 0, _decode_one, lambda ids: "".join(map(_decode_one, ids)))
    ans.add(0, 0, _out([3], _GEN_LPS, "c", "length", _PROMPT_LPS))
    choice = ans.body()["choices"][0]
    assert choice["text"] == "<s>A b" and choice["logprobs"]["tokens"] == ["<s>", "A", " b"]
    assert ans.body()["usage"]["completion_tokens"] == 1  # the engine's step, counted as vLLM counts it


def test_a_stream_holds_a_samples_echo_until_the_prompts_logprobs_come():
    """n = 2: sample 0 alone scores the prompt; sample 1's first delta waits for it, then both echo it."""
    req = _request(echo=True, logprobs=0, n=2, stream=True, stream_options={"include_usage": True})
    ans = CompletionAnswer(req, SERVED, 0, _decode_one, lambda ids: "".join(map(_decode_one, ids)))
    assert ans.chunks(0, 1, _out([3], _GEN_LPS, "c")) == []
    events = ans.chunks(0, 0, _out([1], [{1: Logprob(-1.0, 1, "A")}], "A", prompt_lps=_PROMPT_LPS))
    assert [e["choices"][0]["index"] for e in events] == [0, 1]
    assert [e["choices"][0]["text"] for e in events] == ["<s>A bA", "<s>A bc"]
    assert events[1]["choices"][0]["logprobs"]["token_logprobs"] == [None, -1.5, -0.25, -0.125]
    assert events[0]["choices"][0]["prompt_token_ids"] == [5, 1, 2] and "usage" not in events[0]
    last = ans.chunks(0, 0, _out([2], [{2: Logprob(-0.5, 1, " b")}], " b", "length"))[0]["choices"][0]
    assert last["text"] == " b" and last["finish_reason"] == "length" and last["logprobs"]["text_offset"] == [7]
    assert ans.usage_event()["usage"] == {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3}


def test_tokens_as_ids_name_each_logprobs_token_token_id_n():
    """--return-tokens-as-token-ids (or a request's return_tokens_as_token_ids, which wins): the logprobs' tokens and
    top_logprobs keys `token_id:N` (the echo's first token too), text_offset counting those strings, the text text."""
    req = _request(echo=True, logprobs=1, max_tokens=1, return_tokens_as_token_ids=True)
    assert req.tokens_as_ids is True and _request().tokens_as_ids is None
    ans = CompletionAnswer(req, SERVED, 0, _decode_one, lambda ids: "".join(map(_decode_one, ids)), as_ids=True)
    ans.add(0, 0, _out([3], _GEN_LPS, "c", "length", _PROMPT_LPS))
    choice = ans.body()["choices"][0]
    assert choice["text"] == "<s>A bc"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["token_id:5", "token_id:1", "token_id:2", "token_id:3"]
    assert lp["text_offset"] == [0, 10, 20, 30]
    assert lp["top_logprobs"][1] == {"token_id:1": -1.5, "token_id:4": -0.5}
    with pytest.raises(HttpFieldError) as err:
        _request(return_tokens_as_token_ids="yes")
    assert err.value.field == "return_tokens_as_token_ids"


class _FailingRuns:
    """The engine's outputs of one choice, then a failure: `error` raised, or an output whose finish_reason is
    "error" (the engine failed the request)."""

    def __init__(self, error: Exception | None):
        self.error, self.closed = error, False

    async def __aiter__(self):
        yield 0, 0, _out([3], None, "c")
        if self.error is not None:
            raise self.error
        yield 0, 0, _out([1], None, "A", "error")

    async def aclose(self):
        self.closed = True


@pytest.mark.parametrize("error, status", [(None, 500), (RuntimeError("boom"), 500), (ValueError("bad"), 400)])
def test_an_error_in_a_stream_that_has_begun_is_vllms_error_event_then_done(error, status):
    """vLLM's completion stream: an error after the first event is `data: {"error": {...}}` then `data: [DONE]`
    (serving_completion's GenerationError: InternalServerError 500; a client's fault 400), the request ended."""
    import asyncio

    from moelink.engine.server.gateway.completions_route import _events, sse_events

    req = _request(stream=True)
    ans = CompletionAnswer(req, SERVED, 0, _decode_one, lambda ids: "".join(map(_decode_one, ids)))
    runs = _FailingRuns(error)

    async def collect():
        return [chunk async for chunk in sse_events(_events(req, ans, runs), runs)]

    events = [e for e in b"".join(asyncio.run(collect())).split(b"\n\n") if e]  # as the client reads the bytes
    assert events[0].startswith(b"data: {") and json.loads(events[0][6:])["choices"][0]["text"] == "c"
    assert events[-1] == b"data: [DONE]" and runs.closed
    err = json.loads(events[-2][6:])["error"]
    assert (err["code"], err["param"]) == (status, None) and err["message"]
    assert err["type"] == ("InternalServerError" if status == 500 else "BadRequestError")


@pytest.mark.parametrize("one_choice", [False, True])
def test_a_one_choice_streams_last_event_leaves_with_its_usage_and_done_in_one_chunk(one_choice):
    """sse_events with one choice (one prompt, n 1) holds the event that finishes it and sends it, the usage event and
    [DONE] as one chunk (one write, one send at the stream's end); the events before it go one chunk each, as they
    come. The bytes are the same either way."""
    import asyncio

    from moelink.engine.server.gateway.completions_route import sse_events

    events = [{"choices": [{"text": "a", "finish_reason": None}]}, {"choices": [{"text": "b", "finish_reason": None}]},
              {"choices": [{"text": "c", "finish_reason": "length"}]}, {"choices": [], "usage": {"total_tokens": 3}}]

    async def given():
        for e in events:
            yield e

    class _Runs:
        closed = False

        async def aclose(self):
            self.closed = True

    runs = _Runs()

    async def collect():
        return [chunk async for chunk in sse_events(given(), runs, one_choice=one_choice)]

    chunks = asyncio.run(collect())
    framed = [b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events]
    assert b"".join(chunks) == b"".join(framed) + b"data: [DONE]\n\n" and runs.closed
    if one_choice:
        assert chunks == framed[:2] + [framed[2] + framed[3] + b"data: [DONE]\n\n"]
    else:
        assert chunks == framed + [b"data: [DONE]\n\n"]


def test_fields_left_out_take_the_checkpoints_generation_config():
    """vLLM's --generation-config auto: the checkpoint's temperature / top_p / ... for the fields a body leaves out;
    max_tokens stays the route's 16; a field given wins."""
    serving = SimpleNamespace(limits=RequestLimits(), request_id=lambda rid: rid,
                              info=SimpleNamespace(sampling_defaults={"temperature": 0.7, "top_p": 0.9,
                                                                      "max_tokens": 300}))
    params = read_request({"prompt": [5, 1, 2]}, serving, None, "x").params
    assert (params.temperature, params.top_p, params.max_tokens) == (0.7, 0.9, 16)
    params = read_request({"prompt": [5, 1, 2], "temperature": 0.0}, serving, None, "x").params
    assert (params.temperature, params.top_p) == (0.0, 0.9)


def test_the_request_reader_refuses_what_the_engine_cannot_do_naming_the_field():
    for body, field in (({"suffix": "x"}, "suffix"), ({"use_beam_search": True}, "use_beam_search"),
                        ({"logit_bias": {"a": 5}}, "logit_bias"), ({"logit_bias": {"1": "x"}}, "logit_bias"),
                        ({"allowed_token_ids": [-1]}, "allowed_token_ids"), ({"bad_words": [""]}, "bad_words"),
                        ({"max_tokens": 0}, "max_tokens"),
                        ({"logprobs": -1}, "logprobs"), ({"logprobs": 21}, "logprobs"),
                        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
                        ({"stream_options": {"include_usage": True}}, "stream_options"),
                        ({"top_p": 2.0}, "top_p"), ({"temperature": "hot"}, "temperature"),
                        ({"prompt": []}, "prompt"), ({"prompt": ["a", [1]]}, "prompt[1]"), ({"prompt": ""}, "prompt"),
                        ({"n": 0}, "n"), ({"stop": [""]}, "stop")):
        with pytest.raises(HttpFieldError) as e:
            _request(**body)
        assert e.value.field == field, (body, str(e.value))
    assert _request(suffix=None, logit_bias={}, use_beam_search=False, top_k=0).params.top_k == 0
    # vLLM's logits processors are read as its server reads them: biases clamped to [-100, 100], keys token ids
    params = _request(logit_bias={"7": 300, "9": -2.5}, allowed_token_ids=[7, 9], bad_words=["no"],
                      spaces_between_special_tokens=False).params
    assert params.logit_bias == {7: 100.0, 9: -2.5} and params.allowed_token_ids == [7, 9]
    assert params.bad_words == ["no"] and params.spaces_between_special_tokens is False
    # vLLM's structured-output fields stay smg's (relayed as before); the rest is answered here; a field nobody reads
    # is named (the front answers 400), never relayed to be dropped
    assert claims({"prompt": "x", "logprobs": 1, "echo": True}) and not claims({"prompt": "x", "guided_choice": ["a"]})
    assert not claims({"prompt": "x", "response_format": {"type": "json_object"}}) and not claims([1])
    assert unknown_field({"prompt": "x", "guided_choice": ["a"], "response_format": {}}) is None
    assert unknown_field({"prompt": "x", "guided_choice": ["a"], "temprature": 0.5}) == "temprature"


# -- against `moelink serve` ----------------------------------------------------------------------------------------

@pytest.fixture
def port(openai_server):
    return openai_server[1]


def _ok(port: int, **body) -> dict:
    status, raw = http_request(port, "POST", "/v1/completions", {"model": SERVED, **body}, timeout=60)
    assert status == 200, raw
    return json.loads(raw)


def _stream(port: int, **body) -> list[dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps({"model": SERVED, "stream": True, **body}),
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
        return sse_events(resp)
    finally:
        conn.close()


@pytest.mark.slow  # over 1 s: generations on the shared server and the oracle's
def test_text_and_token_id_prompts_give_the_python_apis_tokens(port, offline):
    want = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    got = _ok(port, prompt=PROMPT, max_tokens=8, temperature=0, ignore_eos=True, return_token_ids=True)
    choice = got["choices"][0]
    assert choice["token_ids"] == want.outputs[0].token_ids and choice["text"] == want.outputs[0].text
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None and choice["stop_reason"] is None
    assert got["usage"] == {"prompt_tokens": len(want.prompt_token_ids), "completion_tokens": 8,
                            "total_tokens": len(want.prompt_token_ids) + 8, "prompt_tokens_details": None,
                            "completion_tokens_details": None}
    assert got["id"].startswith("cmpl-") and got["object"] == "text_completion" and got["model"] == SERVED
    # the prompt as token ids (smg refused them: "did not match any variant of untagged enum")
    ids = _ok(port, prompt=want.prompt_token_ids, max_tokens=8, temperature=0, ignore_eos=True)
    assert ids["choices"][0]["text"] == want.outputs[0].text
    # a batch: a list of strings and a list of token-id lists, choices prompt by prompt
    batch = _ok(port, prompt=[want.prompt_token_ids, [5, 17, 99]], max_tokens=4, temperature=0, ignore_eos=True)
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    assert batch["choices"][0]["text"] == _ok(port, prompt=PROMPT, max_tokens=4, temperature=0,
                                              ignore_eos=True)["choices"][0]["text"]


@pytest.mark.slow  # over 1 s
def test_echo_with_logprobs_gives_the_engines_prompt_logprobs(port, offline):
    """lm-eval's loglikelihood request: echo, logprobs 1, max_tokens 1 (and 0), temperature 0."""
    want = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, logprobs=1),
                            use_tqdm=False)[0]
    ids = want.prompt_token_ids
    for prompt in (PROMPT, ids):
        got = _ok(port, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0)
        choice = got["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(
            [e[t].logprob for t, e in zip(ids[1:], want.prompt_logprobs[1:])], abs=1e-4)
        assert choice["text"] == PROMPT + want.outputs[0].text
        assert "".join(lp["tokens"]) == choice["text"]  # each token's own text, in order
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids) + 1)]
        assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"][1:])  # the token and the top 1
        assert [int(k) for k in choice["prompt_logprobs"][1]][0] == ids[1]
    zero = _ok(port, prompt=ids, echo=True, logprobs=1, max_tokens=0, temperature=0)["choices"][0]
    assert zero["text"] == PROMPT and len(zero["logprobs"]["tokens"]) == len(ids)


@pytest.mark.slow  # over 1 s
def test_top_logprobs_streams_and_n(port, offline):
    want = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3),
                            use_tqdm=False)[0].outputs[0]
    got = _ok(port, prompt=PROMPT, max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)["choices"][0]
    for top, entry, t in zip(got["logprobs"]["top_logprobs"], want.logprobs, want.token_ids):
        assert len(top) == 3  # greedy: the sampled token is the top one, so the top 3 alone
        assert list(top.values()) == pytest.approx(sorted((lp.logprob for lp in entry.values()), reverse=True),
                                                   abs=1e-4)
    events = _stream(port, prompt=PROMPT, max_tokens=6, temperature=0, ignore_eos=True, logprobs=3,
                     stream_options={"include_usage": True})
    texts = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert "".join(texts) == got["text"] and len(texts) > 1
    assert all(e["object"] == "text_completion" for e in events)
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    assert sum((e["choices"][0]["logprobs"]["tokens"] for e in events if e["choices"]), []) == \
        got["logprobs"]["tokens"]
    two = _ok(port, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3, n=2)
    assert [c["index"] for c in two["choices"]] == [0, 1] and two["usage"]["completion_tokens"] <= 10
    streamed = _stream(port, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3, n=2)
    for i in (0, 1):
        assert "".join(e["choices"][0]["text"] for e in streamed if e["choices"][0]["index"] == i) == \
            two["choices"][i]["text"]


@pytest.mark.slow  # over 1 s
def test_logit_bias_allowed_token_ids_and_bad_words_as_the_python_api(port, offline):
    """vLLM's logits processors over HTTP (issue 79): the same tokens as the Python API's with the same fields."""
    body = dict(max_tokens=8, temperature=0, ignore_eos=True)
    cases = ((dict(logit_bias={"7": 100}), dict(logit_bias={7: 100.0})),
             (dict(logit_bias={"7": 5.5, "9": -100}, allowed_token_ids=[7, 9, 11, 300]),
              dict(logit_bias={7: 5.5, 9: -100.0}, allowed_token_ids=[7, 9, 11, 300])),
             (dict(bad_words=["the", "of"]), dict(bad_words=["the", "of"])))
    for http_fields, api_fields in cases:
        want = offline.generate(PROMPT, SamplingParams(**body, **api_fields), use_tqdm=False)[0].outputs[0]
        got = _ok(port, prompt=PROMPT, return_token_ids=True, **body, **http_fields)["choices"][0]
        assert got["token_ids"] == want.token_ids, http_fields
    status, raw = http_request(port, "POST", "/v1/completions",
                               {"model": SERVED, "prompt": "x", "logit_bias": {"999999": 1}})
    assert status == 400 and "logit_bias" in json.loads(raw)["error"]["message"], raw


def test_refusals_name_the_field_and_an_unknown_model_is_404(port):
    for body, field in (({"suffix": "x"}, "suffix"), ({"logprobs": 50}, "logprobs"), ({"prompt": [[1], "a"]},
                                                                                       "prompt[1]")):
        status, raw = http_request(port, "POST", "/v1/completions", {"model": SERVED, "prompt": "x", **body})
        assert status == 400 and json.loads(raw)["error"]["param"] == field, raw
    status, raw = http_request(port, "POST", "/v1/completions", {"model": SERVED, "prompt": "x", "temprature": 0})
    assert status == 400 and json.loads(raw)["error"]["param"] == "temprature", raw  # a typo is named, not ignored
    status, raw = http_request(port, "POST", "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and json.loads(raw)["error"]["param"] == "model", raw
    status, raw = http_request(port, "POST", "/v1/completions", {"model": SERVED, "prompt": [10 ** 9]})
    assert status == 400 and json.loads(raw)["error"]["param"] == "prompt", raw


def test_the_openai_client_parses_the_answer(port):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    out = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2)
    assert out.choices[0].text.startswith(PROMPT) and out.choices[0].logprobs.token_logprobs[0] is None
    assert out.usage.completion_tokens == 3
    chunks = list(client.completions.create(model=SERVED, prompt=[5, 17, 99], max_tokens=3, temperature=0,
                                            stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def _finished(srv, prompt_tokens: int, within_s: float = 20.0) -> str:
    deadline = time.monotonic() + within_s
    while True:
        try:
            return srv.finished_line(prompt_tokens)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_client_that_hangs_up_ends_its_request_in_the_engine(openai_server):
    """Streamed or not, a client that closes its connection ends the request (http_wire.answer_watched), as on
    /generate: the server's request line says it ended long before its max_tokens."""
    srv, port = openai_server
    for stream, n in ((True, 61), (False, 67)):
        body = {"model": SERVED, "prompt": [7] * n, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                "stream": stream}
        raw = json.dumps(body).encode()
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
        if stream:
            assert s.recv(4096).startswith(b"HTTP/1.1 200")  # the head (and perhaps a first event): generating
        else:
            time.sleep(0.3)  # admitted and generating
        s.close()
        line = _finished(srv, n)
        assert "finish_reason=cancelled" in line or "finish_reason=abort" in line, line
