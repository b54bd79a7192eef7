"""vLLM's `POST /v1/chat/completions` answered by `moelink serve`'s HTTP front from the engine beside it
(engine/server/gateway/chat_route.py; docs/vllm-compat.md#v1chatcompletions; issue 79 items 3 to 7).

smg 1.13, which answered every chat, ignored min_tokens, include_stop_str_in_output, truncate_prompt_tokens,
add_generation_prompt false and return_token_ids, lost the last logprobs entry (a stop token), streamed
finish_reason in an extra empty chunk and sampled with its own defaults. The request reader and the answer's builder
are unit-tested first, without a server; then against the shared `moelink serve --http-port` (tests/server/
conftest.py `openai_server`): LLM.chat's tokens, every generated token's logprobs entry, the stream's chunks, a body
smg must carry still relayed, refusals naming the field, and a client that hangs up ending its request."""
from __future__ import annotations

import http.client
import json
import socket
import time
from types import SimpleNamespace

import pytest

from moelink.engine import SamplingParams
from moelink.engine.core.outputs import CompletionOutput, Logprob, RequestOutput
from moelink.engine.server.gateway.chat_answer import ChatAnswer
from moelink.engine.server.gateway.chat_request import claims, read_request, unknown_field
from moelink.engine.server.gateway.openai_fields import HttpFieldError
from moelink.engine.server.limits import RequestLimits

from tests.helpers.smg_gateway import http_request, sse_events

SERVED = "tiny-moe"
MESSAGES = [{"role": "user", "content": "The quick brown fox jumps over"}]
pytestmark = pytest.mark.xdist_group("openai_server")  # one worker starts `openai_server` (tests/server/conftest.py)

# -- the request's reader and the answer's builder, without a server ------------------------------------------------


class _Tok:
    """A template that writes `role: content` lines and a generation prompt; one id per character."""

    def apply_chat_template(self, chat, add_generation_prompt=True, **kw):
        return "".join(f"{m['role']}: {m['content']}\n" for m in chat) + ("assistant:" if add_generation_prompt else "")

    def encode(self, text, special=False):
        return [ord(c) % 50 for c in text]


def _serving(**defaults):
    return SimpleNamespace(limits=RequestLimits(), request_id=lambda rid: rid, text_refusal=lambda f, n: None,
                           ids_refusal=lambda f, n: None, text_only_reason=lambda: "text only",
                           info=SimpleNamespace(sampling_defaults=defaults, max_model_len=64))


def _request(serving=None, **body):
    return read_request({"messages": MESSAGES, **body}, serving or _serving(), _Tok(), None, "x")


def test_max_tokens_default_to_the_context_and_are_capped_there_as_vllms():
    prompt = len(_Tok().encode(_Tok().apply_chat_template(MESSAGES)))
    assert _request().params.max_tokens == 64 - prompt  # left out: up to the context
    assert _request(max_tokens=5).params.max_tokens == 5
    assert _request(max_tokens=60).params.max_tokens == 64 - prompt  # past the room the prompt leaves: capped
    assert _request(max_tokens=5, max_completion_tokens=3).params.max_tokens == 3
    assert _request(truncate_prompt_tokens=4).params.max_tokens == 60
    with pytest.raises(HttpFieldError, match="cannot be greater than max_model_len=64") as e:
        _request(max_tokens=65)
    assert e.value.field == "max_tokens"
    # the checkpoint's generation_config for the fields left out, its max_new_tokens capped too
    params = _request(_serving(temperature=0.7, top_p=0.9, max_tokens=4)).params
    assert (params.temperature, params.top_p, params.max_tokens) == (0.7, 0.9, 4)
    assert _request(_serving(temperature=0.7), temperature=0).params.temperature == 0


def test_the_reader_takes_vllms_chat_fields():
    req = _request(logprobs=True, top_logprobs=3, min_tokens=2, include_stop_str_in_output=True, stop="o",
                   stop_token_ids=[7], ignore_eos=True, seed=1, n=2, return_token_ids=True)
    p = req.params
    assert (p.logprobs, p.min_tokens, p.include_stop_str_in_output, p.stop, p.stop_token_ids, p.ignore_eos) == \
        (3, 2, True, ["o"], [7], True) and req.n == 2 and req.return_token_ids
    assert _request(logprobs=True).params.logprobs == 0 and _request().params.logprobs is None
    echo = _request(echo=True, logprobs=True, top_logprobs=2)
    assert echo.params.prompt_logprobs == 2  # vLLM's: echo scores the prompt with top_logprobs
    wizard = _request(messages=[{"role": "wizard", "content": "hi"}], add_generation_prompt=False)
    assert wizard.role == "wizard" and wizard.rendered.text == "wizard: hi\n"
    assert _request(messages=[{"role": "wizard", "content": "hi"}]).role == "assistant"
    cont = _request(messages=MESSAGES + [{"role": "assistant", "content": "The lazy"}], echo=True,
                    add_generation_prompt=False, continue_final_message=True)
    assert cont.rendered.text.endswith("assistant: The lazy") and cont.echoed == "The lazy"
    parts = _request(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                            {"type": "text", "text": "b"}]}])
    assert parts.rendered.text.startswith("user: a\nb\n")  # vLLM joins text parts by newlines


def test_the_reader_refuses_naming_the_field():
    for body, field in (({"use_beam_search": True}, "use_beam_search"), ({"logit_bias": {"x": 5}}, "logit_bias"),
                        ({"bad_words": [1]}, "bad_words"), ({"allowed_token_ids": "x"}, "allowed_token_ids"),
                        ({"chat_template": "{{x}}"}, "chat_template"), ({"top_logprobs": 2}, "top_logprobs"),
                        ({"stream_options": {"include_usage": True}}, "stream_options"),
                        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
                        ({"max_tokens": 0}, "max_tokens"), ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
                        ({"tools": []}, "tools"), ({"messages": []}, "messages"),
                        ({"add_generation_prompt": True, "continue_final_message": True}, "continue_final_message"),
                        ({"top_p": 2.0}, "top_p"), ({"n": 0}, "n"), ({"reasoning_effort": "huge"}, "reasoning_effort")):
        with pytest.raises(HttpFieldError) as e:
            _request(**body)
        assert e.value.field == field, (body, str(e.value))
    assert _request(logit_bias={}, bad_words=[], use_beam_search=False, stream_options={}).params.n == 1


def test_what_only_smg_carries_is_relayed():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert claims({"messages": MESSAGES, "logprobs": True, "min_tokens": 2})
    assert claims({"messages": MESSAGES, "tools": [tool], "tool_choice": "none"})  # the template sees the tools
    assert not claims({"messages": MESSAGES, "tools": [tool]})  # tool_choice "auto": smg's parser reads the calls
    assert not claims({"messages": MESSAGES, "tools": [tool], "tool_choice": "required"})
    assert not claims({"messages": MESSAGES, "response_format": {"type": "json_object"}})
    assert claims({"messages": MESSAGES, "response_format": {"type": "text"}})
    assert not claims({"messages": MESSAGES, "guided_choice": ["a"]})
    assert not claims({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert not claims({"messages": MESSAGES}, relay_all=True)  # a --reasoning-parser server: smg splits reasoning
    assert not claims({"messages": MESSAGES, "temprature": 0}) and unknown_field({"temprature": 0}) == "temprature"
    assert unknown_field({"messages": MESSAGES, "guided_choice": ["a"]}) is None


_TEXTS = {1: "A", 2: " b", 3: "c", 9: "<|end|>"}


def _decode_one(t: int) -> str:
    return _TEXTS.get(t, f"<{t}>")


def _out(ids, lps, text, finish=None, stop_reason=None, prompt_lps=None):
    comp = CompletionOutput(0, text, list(ids), None, lps, finish, stop_reason)
    return RequestOutput("r", None, [5, 1, 2], [comp], finish is not None, prompt_logprobs=prompt_lps)


def _lp(token: int, logprob: float, rank: int, *others) -> dict:
    entry = {token: Logprob(logprob, rank, _TEXTS[token])}
    entry.update({t: Logprob(lp, r, _TEXTS[t]) for t, lp, r in others})
    return entry


def test_every_generated_token_has_its_logprobs_entry_the_stop_token_too():
    """issue 79 item 5: smg lost the last entry (a stop token, <|endoftext|>): 8 entries for 9 tokens."""
    req = _request(logprobs=True, top_logprobs=2, return_token_ids=True)
    ans = ChatAnswer(req, SERVED, 0, _decode_one)
    ans.add(0, _out([1, 2], [_lp(1, -0.5, 1, (3, -1.5, 2)), _lp(2, -2.0, 3, (1, -0.25, 1), (3, -1.0, 2))], "A b"))
    ans.add(0, _out([9], [_lp(9, -0.125, 1, (1, -3.0, 2))], "", "stop", 9))
    body = ans.body()
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "A b", "refusal": None, "annotations": None,
                                 "audio": None, "function_call": None, "reasoning": None}
    assert (choice["finish_reason"], choice["stop_reason"], choice["token_ids"]) == ("stop", 9, [1, 2, 9])
    content = choice["logprobs"]["content"]
    assert [e["token"] for e in content] == ["A", " b", "<|end|>"] and content[2]["logprob"] == -0.125
    assert content[2]["bytes"] == list(b"<|end|>")
    # the sampled token first, then the rest by rank, the first top_logprobs of them (vLLM's order)
    assert [t["token"] for t in content[1]["top_logprobs"]] == [" b", "A"]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3,
                             "prompt_tokens_details": None, "completion_tokens_details": None}
    assert body["prompt_token_ids"] == [5, 1, 2] and body["object"] == "chat.completion" and body["id"] == "chatcmpl-x"


def test_tokens_as_ids_name_each_logprobs_token_by_its_id_and_keep_its_texts_bytes():
    """--return-tokens-as-token-ids (or the request's return_tokens_as_token_ids, which wins over it), as vLLM."""
    req = _request(logprobs=True, top_logprobs=2, return_tokens_as_token_ids=True)
    assert req.tokens_as_ids is True and _request().tokens_as_ids is None
    with pytest.raises(HttpFieldError) as e:
        _request(return_tokens_as_token_ids="yes")
    assert e.value.field == "return_tokens_as_token_ids"
    ans = ChatAnswer(req, SERVED, 0, _decode_one, as_ids=True)
    ans.add(0, _out([1, 2], [_lp(1, -0.5, 1, (3, -1.5, 2)), _lp(2, -2.0, 3, (1, -0.25, 1))], "A b", "length"))
    content = ans.body()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["token_id:1", "token_id:2"] and content[1]["bytes"] == list(b" b")
    assert [t["token"] for t in content[1]["top_logprobs"]] == ["token_id:2", "token_id:1"]
    assert ans.body()["choices"][0]["message"]["content"] == "A b"  # the text stays text


def test_a_stream_opens_each_choice_and_carries_finish_reason_in_its_last_content_chunk():
    req = _request(stream=True, stream_options={"include_usage": True}, n=2, return_token_ids=True)
    ans = ChatAnswer(req, SERVED, 0, _decode_one)
    events = ans.chunks(1, _out([1], None, "A"))
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert events[0]["prompt_token_ids"] == [5, 1, 2] and "token_ids" not in events[0]["choices"][0]
    assert events[2]["choices"][0] == {"index": 1, "delta": {"content": "A"}, "logprobs": None,
                                       "finish_reason": None, "token_ids": [1]}
    last = ans.chunks(1, _out([2], None, " b", "length"))
    assert len(last) == 1 and last[0]["choices"][0]["finish_reason"] == "length"  # no extra empty chunk
    assert last[0]["choices"][0]["stop_reason"] is None and last[0]["object"] == "chat.completion.chunk"
    assert ans.chunks(0, _out([], None, "")) == []  # no empty chunk before a choice's first token
    ans.chunks(0, _out([3], None, "c", "length"))
    assert ans.usage_event() == {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": SERVED,
                                 "choices": [], "usage": {"prompt_tokens": 3, "total_tokens": 6,
                                                          "completion_tokens": 3}}


# -- against `moelink serve` ----------------------------------------------------------------------------------------

@pytest.fixture
def port(openai_server):
    return openai_server[1]


def _ok(port: int, **body) -> dict:
    status, raw = http_request(port, "POST", "/v1/chat/completions", {"model": SERVED, "messages": MESSAGES, **body},
                               timeout=60)
    assert status == 200, raw
    return json.loads(raw)


def _stream(port: int, **body) -> list[dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", headers={"content-type": "application/json"},
                     body=json.dumps({"model": SERVED, "messages": MESSAGES, "stream": True, **body}))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
        return sse_events(resp)
    finally:
        conn.close()


@pytest.mark.slow  # over 1 s: generations on the shared server and the oracle's
def test_greedy_answers_are_llm_chats_tokens_and_every_token_has_its_logprobs(port, offline):
    want = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    got = _ok(port, max_tokens=8, temperature=0, ignore_eos=True, return_token_ids=True, logprobs=True,
              top_logprobs=2)
    choice = got["choices"][0]
    ids = want.outputs[0].token_ids
    assert choice["token_ids"] == ids and choice["message"]["content"] == want.outputs[0].text
    assert got["prompt_token_ids"] == want.prompt_token_ids and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["content"]) == 8 and all(len(e["top_logprobs"]) == 2
                                                           for e in choice["logprobs"]["content"])
    # ended by a stop token (the greedy third): its entry is there too, and it is the stop_reason
    stopped = _ok(port, max_tokens=8, temperature=0, stop_token_ids=[ids[2]], logprobs=True,
                  return_token_ids=True)["choices"][0]
    assert (stopped["finish_reason"], stopped["stop_reason"]) == ("stop", ids[2])
    assert len(stopped["logprobs"]["content"]) == len(stopped["token_ids"]) == 3
    assert [e["logprob"] for e in stopped["logprobs"]["content"]] == pytest.approx(
        [e["logprob"] for e in choice["logprobs"]["content"][:3]], abs=1e-4)
    assert _ok(port, max_tokens=8, temperature=0, ignore_eos=True)["usage"]["completion_tokens"] == 8


@pytest.mark.slow  # over 1 s
def test_the_stream_adds_up_to_the_whole_answer_in_vllms_chunks(port):
    whole = _ok(port, max_tokens=6, temperature=0, ignore_eos=True, logprobs=True)["choices"][0]
    events = _stream(port, max_tokens=6, temperature=0, ignore_eos=True, logprobs=True, return_token_ids=True,
                     stream_options={"include_usage": True})
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    content = [e for e in events[1:] if e["choices"]]
    assert "".join(e["choices"][0]["delta"]["content"] for e in content) == whole["message"]["content"]
    finishes = [e["choices"][0]["finish_reason"] for e in content]
    assert finishes[-1] == "length" and not any(finishes[:-1])  # in the last content chunk, not an extra one
    assert content[-1]["choices"][0]["token_ids"]
    assert sum((e["choices"][0]["logprobs"]["content"] for e in content), []) == whole["logprobs"]["content"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6


@pytest.mark.slow  # over 1 s: 495 tokens
def test_max_tokens_past_the_prompts_room_are_capped_and_past_the_context_refused(port):
    """vLLM 0.32's chat: max_tokens over what the prompt leaves of max_model_len (512 here) runs to the context;
    over max_model_len itself it is 400 naming max_tokens."""
    usage = _ok(port, max_tokens=510, temperature=0, ignore_eos=True)["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 512, usage
    status, raw = http_request(port, "POST", "/v1/chat/completions", {"model": SERVED, "messages": MESSAGES,
                                                                     "max_tokens": 600})
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == "max_tokens" and "max_model_len=512" in error["message"], raw


def test_a_body_needing_smg_is_still_relayed(port):
    """response_format is smg's (it builds the engine's constraint): smg's answer, told from the front's by smg's
    `annotations: []` where vLLM's (and the front's) is null; its reasoning renamed vLLM's `reasoning` on the way
    back (quirks.vllm_reasoning_key)."""
    front = _ok(port, max_tokens=2, temperature=0)["choices"][0]["message"]
    relayed = _ok(port, max_tokens=2, temperature=0, response_format={"type": "json_object"})["choices"][0]["message"]
    assert front["annotations"] is None and "reasoning" in front and "reasoning_content" not in front
    assert relayed["annotations"] == [] and "reasoning_content" not in relayed


def test_refusals_name_the_field_and_an_unknown_model_is_404(port):
    for body, field in (({"use_beam_search": True}, "use_beam_search"), ({"logit_bias": {"7": "high"}}, "logit_bias"),
                        ({"top_logprobs": 2}, "top_logprobs"), ({"temprature": 0}, "temprature"),
                        ({"max_tokens": 100000}, "max_tokens"), ({"messages": "hi"}, "messages")):
        status, raw = http_request(port, "POST", "/v1/chat/completions", {"model": SERVED, "messages": MESSAGES,
                                                                         **body})
        assert status == 400 and json.loads(raw)["error"]["param"] == field, raw
    # refused before a relay too: smg would drop it
    status, raw = http_request(port, "POST", "/v1/chat/completions", {"model": SERVED, "messages": MESSAGES,
                                                                     "guided_choice": ["a"], "bad_words": ["x"]})
    assert status == 400 and json.loads(raw)["error"]["param"] == "bad_words", raw
    status, raw = http_request(port, "POST", "/v1/chat/completions", {"model": "nope", "messages": MESSAGES})
    assert status == 404 and json.loads(raw)["error"]["param"] == "model", raw


def test_the_answers_id_is_the_x_request_id_header_as_vllms(port):
    status, raw = http_request(port, "POST", "/v1/chat/completions", {"model": SERVED, "messages": MESSAGES,
                                                                     "max_tokens": 1, "request_id": "body-id"},
                               headers={"x-request-id": "trace-7"})
    assert status == 200 and json.loads(raw)["id"] == "chatcmpl-trace-7", raw
    assert _ok(port, max_tokens=1, request_id="body-id")["id"] == "chatcmpl-body-id"


def test_the_openai_client_parses_the_answer(port):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    out = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True,
                                         top_logprobs=1)
    assert out.choices[0].message.role == "assistant" and len(out.choices[0].logprobs.content) == 3
    chunks = list(client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=3, temperature=0,
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


def test_a_client_that_hangs_up_ends_its_request_in_the_engine(openai_server, offline):
    """Streamed or not, a client that closes its connection ends the request (http_wire.answer_watched): the
    server's request line says it ended long before its max_tokens."""
    srv, port = openai_server
    tok = offline.get_tokenizer()
    for stream, words in ((True, 23), (False, 29)):
        messages = [{"role": "user", "content": " ".join(["fox"] * words)}]
        n = len(tok.apply_chat_template(messages, tokenize=True))
        body = {"model": SERVED, "messages": messages, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                "stream": stream}
        raw = json.dumps(body).encode()
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
        if stream:
            assert s.recv(4096).startswith(b"HTTP/1.1 200")  # the head (and perhaps a first chunk): generating
        else:
            time.sleep(0.3)  # admitted and generating
        s.close()
        line = _finished(srv, n)
        assert "finish_reason=cancelled" in line or "finish_reason=abort" in line, line
