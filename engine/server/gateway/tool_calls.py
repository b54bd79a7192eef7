"""A `tool_choice: "required"` call with `parallel_tool_calls: false` is one call: smg (1.13) forgets the second part.

How a forced call is made: smg turns `tool_choice: "required"` into a JSON-schema constraint that the engine
compiles, an array of calls `[{"name": ..., "parameters": {...}}, ...]` (`minItems: 1`, each item one of the tools),
and reads the output back as that array itself, not with the model's `--tool-call-parser` (whose syntax the model
was not let to write). vLLM, and smg's later sources, add `maxItems: 1` when the request says
`parallel_tool_calls: false`; smg 1.13 does not (seen: the same schema either way), so a model that does not close
the array by itself (the tests' random model) writes calls until `max_tokens` cuts one, and smg then returned no
call at all (the cut array unparsed, in `content`) or, streamed, the cut call with its arguments cut (issue 54
item 5). With the array closed after one call, both paths return it whole, `finish_reason: tool_calls`.

smg does not pass `parallel_tool_calls` to the worker, but the managed gateway's front reads the request
(http_front.py): it notes the relay id of a chat request asking one required call (`asks_one_call`), smg sends the
call under that relay id (hangups.py), and the VllmEngine service closes smg's array after one item (`one_call`)
for that request: `maxItems: 1`, what smg's later sources send. Only the array smg builds is touched (its exact
shape, quirks.is_required_calls_schema), and one that has a `maxItems` already is left as it is. A front started by hand
(`moelink http-front`) runs in another process than the server: there, smg's array stays as smg sends it.

A call cut by `max_tokens` is smg's to read: streamed, smg 1.13 sends it as a call, its arguments completed by a
partial-JSON parser; not streamed, calls before the cut are not returned (docs/vllm-compat.md).
"""
from __future__ import annotations

import json
from typing import Optional

from ...contract.structured_output_params import StructuredOutputParams
from .hangups import relay_of
from .quirks import close_required_calls_after_one

# Relay ids (hangups.py) of the chat requests being relayed that ask for one required call: the front adds one
# before it relays the request and removes it when the relay ends; the servicer reads it. One process, one loop.
_ONE_CALL: set[str] = set()


def asks_one_call(body: dict) -> bool:
    """Whether an OpenAI chat request asks for exactly one forced call: tools, `tool_choice: "required"` (or
    `{"type": "allowed_tools", "mode": "required"}`), and `parallel_tool_calls: false`."""
    if body.get("parallel_tool_calls") is not False or not body.get("tools"):
        return False
    choice = body.get("tool_choice")
    return choice == "required" or (isinstance(choice, dict) and choice.get("mode") == "required")


def note_one_call(relay_id: str) -> None:
    """The front relays, under `relay_id`, a chat request that asks for one required call (`asks_one_call`)."""
    _ONE_CALL.add(relay_id)


def forget(relay_id: str) -> None:
    """The relay of `relay_id` has ended."""
    _ONE_CALL.discard(relay_id)


def one_call(structured: Optional[StructuredOutputParams], request_id: str) -> Optional[StructuredOutputParams]:
    """`structured` with smg's array of required calls closed after one item when the front noted that the request
    behind `request_id` asked for one call; else `structured` itself."""
    if not _ONE_CALL or structured is None or structured.json is None:
        return structured
    relay = relay_of(request_id)
    if relay is None or relay not in _ONE_CALL:
        return structured
    schema = json.loads(structured.json) if isinstance(structured.json, str) else structured.json
    closed = close_required_calls_after_one(schema)
    return structured if closed is None else StructuredOutputParams(json=json.dumps(closed))
