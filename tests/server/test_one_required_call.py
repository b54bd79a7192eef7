"""Issue 54 item 5: `tool_choice: "required"` with `parallel_tool_calls: false` is one call (engine/server/gateway/tool_calls.py).

smg 1.13 forces an array of calls without `maxItems` whatever `parallel_tool_calls` says, and drops that field
before the worker; the front notes the request's relay id, and the VllmEngine service closes smg's array after one
call for it. Unit tests here; the families' end-to-end calls are in tests/server/test_tool_calls.py."""
from __future__ import annotations

import json

import pytest

from moelink.engine.contract.structured_output_params import StructuredOutputParams
from moelink.engine.server.gateway import tool_calls
from moelink.engine.server.gateway.hangups import new_relay_id

# What smg 1.13 sent the worker for tool_choice "required" (captured from a VllmEngine request).
SMG_REQUIRED = ('{"type":"array","minItems":1,"items":{"type":"object","anyOf":[{"properties":{"name":{"type":'
                '"string","enum":["get_weather"]},"parameters":{"type":"object","properties":{"city":{"type":"string",'
                '"enum":["Paris","Rome"]}},"required":["city"]}},"required":["name","parameters"]}]}}')
UUID = "-01a214ae-5072-7597-a344-b31eac9431b0"  # smg's request id: the relay id, "-", a UUID


@pytest.fixture
def relay():
    relay_id = new_relay_id("chatcmpl")
    tool_calls.note_one_call(relay_id)
    yield relay_id
    tool_calls.forget(relay_id)


def test_smgs_required_array_is_closed_after_one_call_for_a_noted_request(relay):
    got = tool_calls.one_call(StructuredOutputParams(json=SMG_REQUIRED), relay + UUID)
    assert json.loads(got.json) == {**json.loads(SMG_REQUIRED), "maxItems": 1}


def test_nothing_else_is_touched(relay):
    params = StructuredOutputParams(json=SMG_REQUIRED)
    assert tool_calls.one_call(params, new_relay_id("chatcmpl") + UUID) is params  # another request
    assert tool_calls.one_call(params, "plain-id") is params
    tool_calls.forget(relay)
    assert tool_calls.one_call(params, relay + UUID) is params  # its relay ended
    tool_calls.note_one_call(relay)
    for other in ({"type": "object", "properties": {"city": {"type": "string"}}},  # a named call's parameters
                  {**json.loads(SMG_REQUIRED), "maxItems": 2},  # smg said how many itself
                  {**json.loads(SMG_REQUIRED), "minItems": 2},
                  {"type": "array", "minItems": 1, "items": {"type": "string"}}):
        p = StructuredOutputParams(json=json.dumps(other))
        assert tool_calls.one_call(p, relay + UUID) is p, other
    for p in (None, StructuredOutputParams(regex="[a-z]+"), StructuredOutputParams(json_object=True)):
        assert tool_calls.one_call(p, relay + UUID) is p


def test_what_asks_for_one_call():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert tool_calls.asks_one_call({"tools": tools, "tool_choice": "required", "parallel_tool_calls": False})
    assert tool_calls.asks_one_call({"tools": tools, "parallel_tool_calls": False,
                                     "tool_choice": {"type": "allowed_tools", "mode": "required", "tools": []}})
    for body in ({"tools": tools, "tool_choice": "required"},  # parallel calls allowed (OpenAI's default)
                 {"tools": tools, "tool_choice": "required", "parallel_tool_calls": True},
                 {"tools": tools, "tool_choice": "auto", "parallel_tool_calls": False},
                 {"tool_choice": "required", "parallel_tool_calls": False}):
        assert not tool_calls.asks_one_call(body), body


def test_the_front_notes_the_relay_while_it_relays(monkeypatch):
    """The front's relay holds the note exactly while smg's call can arrive, under the relay id it sends smg."""
    import asyncio

    from moelink.engine.server.gateway import http_front
    from moelink.engine.server.gateway.hangups import RELAY_HEADER
    from tests.helpers.net import free_port
    from tests.helpers.smg_gateway import http_request

    seen = {}

    async def upstream(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        relay_id = next(line.split(b": ", 1)[1].decode() for line in head.split(b"\r\n")
                        if line.lower().startswith(RELAY_HEADER.encode()))
        length = int(next(line.split(b": ", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        seen[relay_id] = tool_calls.one_call(StructuredOutputParams(json=SMG_REQUIRED), relay_id + UUID).json
        body = b'{"ok": true}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async def scenario():
        smg = await asyncio.start_server(upstream, "127.0.0.1", 0)
        front = http_front.HttpFront("127.0.0.1", free_port(), smg.sockets[0].getsockname()[1])
        await front.start()
        try:
            tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
            for parallel in (False, True):
                body = dict(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools,
                            tool_choice="required", parallel_tool_calls=parallel)
                status, _ = await asyncio.to_thread(http_request, front.port, "POST", "/v1/chat/completions", body)
                assert status == 200
        finally:
            await front.stop()
            smg.close()

    asyncio.run(scenario())
    one, many = seen.values()
    assert json.loads(one)["maxItems"] == 1 and "maxItems" not in json.loads(many)
    assert not tool_calls._ONE_CALL  # forgotten once relayed
