"""Issue 41 low 4: JSON nested past MAX_JSON_DEPTH is refused naming the field, the depth found and the limit,
before anything recursive reads it (engine/contract/json_depth.py). The gRPC services' answers are in
tests/server/test_structured_output_grpc.py; here the measure itself, every place that parses a client's JSON
out of a server (a 100,000-deep `[[[...` in each), and the HTTP front's 400."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from moelink.engine.contract.json_depth import (MAX_JSON_DEPTH, check_value, deep_path, text_depth, too_deep,
                                                value_depth)
from moelink.engine.contract.structured_output_params import StructuredOutputParams
from moelink.engine.server.gateway.http_front import HttpFront
from moelink.engine.server.gateway.openai_fields import HttpFieldError, rewrite
from moelink.engine.server.pd_role import kv_params_from_json

from tests.helpers.net import free_port

DEEP = 100_000


def _nested(depth: int) -> dict:
    d: dict = {"type": "string"}
    for _ in range(depth - 1):
        d = {"type": "array", "items": d}
    return d


def test_text_depth_counts_brackets_outside_strings_at_c_speed():
    texts = ("1", '"[[["', "{}", '{"a": [[1]], "b": "]]]"}', '{"x": "\\"[["}')
    assert [text_depth(t) for t in texts] == [0, 0, 1, 3, 1]
    assert text_depth("[" * DEEP) == DEEP and text_depth(b"[[]][[[]]]") == 3
    big = "[" + "[1]," * 4_000_000 + "[1]]"  # 16 MB, wide and shallow
    t0 = time.monotonic()
    assert text_depth(big) == 2
    assert time.monotonic() - t0 < 5


def test_value_depth_walks_without_recursion_and_stops():
    assert value_depth(_nested(5000)) == 5000 and value_depth(3) == 0 and value_depth([[], {"a": ()}]) == 3
    loop: list = []
    loop.append(loop)  # contains itself: the walk stops past `stop`
    assert value_depth(loop, stop=50) == 51
    with pytest.raises(ValueError, match=r"^x is invalid: it nests more than 12800 levels"):
        check_value(loop, "x")


def test_deep_path_names_where_it_gets_too_deep():
    body = json.dumps({"model": "m", "response_format": {"json_schema": {"schema": _nested(300)}}})
    assert deep_path(body) == "response_format.json_schema.schema.items..."
    assert deep_path('{"metadata": [1, ' + "[" * DEEP) == "metadata[1][0][0]..."
    assert deep_path(json.dumps({"a": _nested(100)})) is None


@pytest.mark.parametrize("make", [
    lambda: StructuredOutputParams(json='{"type": "array", "items": ' * 1000 + "{}" + "}" * 1000),
    lambda: StructuredOutputParams(json="[" * DEEP),
    lambda: StructuredOutputParams(json=_nested(1000)),
])
def test_a_deep_schema_is_a_value_error_naming_the_field(make):
    with pytest.raises(ValueError, match=r"^SamplingParams\.structured_outputs\.json=.* is invalid: it nests \d+ "
                                         r"levels of arrays and objects, at most 128 are allowed"):
        make()
    StructuredOutputParams(json=_nested(MAX_JSON_DEPTH))  # the limit itself is fine


def test_every_json_a_server_parses_is_measured_first():
    with pytest.raises(ValueError, match=r"^kv_transfer_params_json is invalid: it nests 16000 levels"):
        kv_params_from_json("[" * 16_000)
    # The HTTP front's rewrite of vLLM's fields: a dict value is walked, not dumped.
    with pytest.raises(HttpFieldError, match=r"^guided_json=.* it nests 1000 levels") as e:
        rewrite("/v1/chat/completions", {"guided_json": _nested(1000)})
    assert e.value.field == "guided_json"
    with pytest.raises(HttpFieldError, match=r"^structured_outputs\.json=.* it nests \d+ levels"):
        rewrite("/v1/completions", {"structured_outputs": {"json": "[" * DEEP}})
    assert too_deep("f", 7, 3) == "f is invalid: it nests 7 levels of arrays and objects, at most 3 are allowed " \
                                  "(flatten it)."


def test_the_front_answers_400_naming_the_deep_field():
    """A 100,000-deep body closed the connection without an answer (RecursionError in the front's json.loads)."""
    async def scenario(body: bytes):
        front = HttpFront("127.0.0.1", free_port(), free_port())  # never relayed: refused first
        await front.start()
        try:
            def post():
                s = socket.create_connection(("127.0.0.1", front.port))
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                          b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
                s.settimeout(30)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                s.close()
                return data
            return await asyncio.to_thread(post)
        finally:
            await front.stop()

    for body, param, depth in (
            (b'{"model": "m", "metadata": ' + b"[" * DEEP + b"]" * DEEP + b"}", "metadata", DEEP + 1),
            (b'{"model": "m", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": '
             + b'{"type": "array", "items": ' * 999 + b'{"type": "string"}' + b"}" * 999 + b"}}}", "response_format",
             1003),
            # Big enough to be inspected off the event loop.
            (b'{"model": "m", "prompt": "' + b"x" * (1 << 20) + b'", "tools": ' + b"[" * 500 + b"]" * 500 + b"}",
             "tools", 501)):
        raw = asyncio.run(scenario(body))
        assert raw.startswith(b"HTTP/1.1 400"), raw[:300]
        err = json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]
        assert err["param"] == param, err
        assert err["message"].startswith(f"{param}") and f"it nests {depth} levels of arrays and objects, at most " \
            f"128 are allowed" in err["message"], err


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1])
def test_the_fronts_depth_check_holds_at_the_limit_whatever_its_bracket_count_shortcut(depth):
    """refuse_too_deep lets a body through by its bracket count alone when it opens at most MAX_JSON_DEPTH brackets
    (it cannot nest deeper): the limit itself still holds, one past it is refused naming the field, and a body
    with many brackets but shallow is measured and let through."""
    from moelink.engine.server.gateway.openai_fields import refuse_too_deep

    body = ('{"messages": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}").encode()
    if depth > MAX_JSON_DEPTH:
        with pytest.raises(HttpFieldError) as e:
            refuse_too_deep(body)
        assert e.value.field == "messages"
    else:
        refuse_too_deep(body)
    refuse_too_deep(json.dumps({"prompt": [[1, 2]] * (4 * MAX_JSON_DEPTH)}).encode())  # wide, not deep
