"""The JSON body of a route the HTTP front answers itself (vllm_routes.py, generate_route.py): one object, its
flags checked, each refusal naming the field (HttpFieldError, answered 400 by the route)."""
from __future__ import annotations

import asyncio
import json
from typing import Callable, TypeVar

from ...contract.safe_text import shown
from .openai_fields import HttpFieldError, refuse_too_deep

T = TypeVar("T")

# Bodies up to this size are parsed on the event loop (well under a millisecond); larger ones on a worker thread.
INLINE_BODY_BYTES = 256 << 10


async def off_loop(body: bytes, parse: Callable[..., T], *args) -> T:
    """`parse(*args)`, which reads `body`: on a worker thread when the body is over INLINE_BODY_BYTES. The event loop
    carries every other connection and every engine stream; a 60 MB /generate body parsed and checked on it held
    every stream for 9.5 s (issue 76 item 8). json.loads still holds the GIL while it runs, which is why the routes'
    bodies are also bounded (RequestLimits.max_http_body_bytes); the checks after it, Python loops over the prompts,
    let the loop in every switch interval."""
    if len(body) <= INLINE_BODY_BYTES:
        return parse(*args)
    return await asyncio.to_thread(parse, *args)


def json_object(body: bytes) -> dict:
    """The request body as a JSON object; too deep, not JSON or not an object refused naming `body`."""
    refuse_too_deep(body)
    try:
        data = json.loads(body)
    except ValueError as e:
        raise HttpFieldError("body", f"the request body is not JSON ({shown(str(e), quote=False)}).") from None
    if not isinstance(data, dict):
        raise HttpFieldError("body", f"the request body must be a JSON object, not {kind_of(data)}.")
    return data


def json_text_object(body: bytes) -> dict:
    """`json_object`, every string in it (keys too) valid Unicode (`refuse_lone_surrogates`): what the routes that
    answer from the engine parse, so that no field a request echoes or logs holds a lone surrogate."""
    data = json_object(body)
    if b"\\ud" in body or b"\\uD" in body:  # only an escape makes one: most bodies skip the walk
        refuse_lone_surrogates(data)
    return data


def refuse_lone_surrogates(data) -> None:
    """HttpFieldError naming the first string of `data` (a parsed JSON value: keys and values, at any depth) that
    is not valid Unicode text. JSON may escape a lone surrogate ("\\ud800"), which no UTF-8 text holds: encoded into
    an answer, a log line or the tokenizer it raised a TypeError or UnicodeEncodeError (a 500, or a dropped
    connection after the request ran)."""
    stack = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            valid_text(value, where or "body")
        elif isinstance(value, dict):
            for key, item in value.items():
                name = f"{where}.{key}" if where else str(key)
                valid_text(key, where or "body")
                if not isinstance(item, (int, float, bool)) and item is not None:
                    stack.append((item, shown(name, quote=False)))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value)
                         if isinstance(item, (str, list, dict)))


def valid_text(text: str, field: str) -> str:
    """`text` when it is valid Unicode; else HttpFieldError naming `field` (the one check every route's string
    fields go through)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HttpFieldError(field, f"{field} is not valid Unicode text: it holds a lone surrogate "
                                    f"(\\u{ord(text[e.start]):04x}) at character {e.start}.") from None
    return text


def json_flag(data: dict, name: str, default: bool = False) -> bool:
    """Field `name` of `data` as a boolean (absent or null: `default`); anything else refused naming it."""
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HttpFieldError(name, f"{name} must be true or false, not {kind_of(value)}.")
    return value


def kind_of(value) -> str:
    """What a JSON value is, for an error message."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


__all__ = ["INLINE_BODY_BYTES", "json_flag", "json_object", "json_text_object", "kind_of", "off_loop",
           "refuse_lone_surrogates", "valid_text"]
