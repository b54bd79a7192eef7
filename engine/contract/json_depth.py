"""How deep a client's JSON nests, measured before anything recursive reads it (issue 41, low 4).

Why: json.loads, json.dumps and the schema walks recurse once per level of arrays and objects, and Python's
stack holds about a thousand: a 1,000-deep JSON schema answered INTERNAL (RecursionError) instead of
INVALID_ARGUMENT, and a 100,000-deep `[[[...` body closed the HTTP front's connection without an answer. So each
JSON text a request carries (a JSON schema, kv_transfer_params_json, the HTTP front's body) is measured first,
without recursion and at C speed (strings cut out by one regex, the brackets summed by numpy), and a dict or
list given as a value is walked with a stack of its own; past MAX_JSON_DEPTH the request is refused with one
sentence naming the field, the depth found and the limit. 128 is serde_json's default, the depth the managed gateway
(engine/server/gateway/) itself holds HTTP bodies to, and far beyond any real JSON schema.
"""
from __future__ import annotations

import re
from typing import Optional, Union

MAX_JSON_DEPTH = 128
_CHUNK = 1 << 20  # bytes summed at once: numpy's working memory stays a few MiB whatever the text's size
# A JSON string (possessive: linear time, no backtracking), and what is left of one that never closes.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"|"[^"]*+\Z', re.S)
_TOKEN = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}:,]', re.S)
_MAX_PATH_PARTS = 4


def text_depth(text: Union[str, bytes]) -> int:
    """The deepest nesting of arrays and objects in JSON text (the top level counts 1; brackets inside strings
    do not count). Malformed text is measured as written: only the parse that follows tells it is not JSON."""
    import numpy as np

    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if b"[" not in data and b"{" not in data:
        return 0
    brackets = _STRING.sub(b"", data)
    steps = np.zeros(256, dtype=np.int8)
    steps[[ord("["), ord("{")]] = 1
    steps[[ord("]"), ord("}")]] = -1
    deepest, level = 0, 0
    for start in range(0, len(brackets), _CHUNK):
        chunk = np.cumsum(steps[np.frombuffer(brackets, np.uint8, min(_CHUNK, len(brackets) - start), start)],
                          dtype=np.int64) + level
        deepest, level = max(deepest, int(chunk.max())), int(chunk[-1])
    return deepest


def value_depth(value, stop: Optional[int] = None) -> int:
    """The deepest nesting of dicts, lists and tuples in `value` (a scalar is 0), walked without recursion;
    once deeper than `stop` it returns at once (a value that contains itself ends there too)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, (list, tuple)):
            children = v
        else:
            continue
        deepest = max(deepest, depth)
        if stop is not None and deepest > stop:
            return deepest
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list, tuple)))
    return deepest


def too_deep(field: str, depth: Union[int, str], limit: int = MAX_JSON_DEPTH) -> str:
    """The one-sentence refusal of JSON nested `depth` levels in `field`."""
    return (f"{field} is invalid: it nests {depth} levels of arrays and objects, at most {limit} are allowed "
            f"(flatten it).")


def check_text(text: Union[str, bytes], field: str, limit: int = MAX_JSON_DEPTH) -> None:
    """ValueError (too_deep) when JSON text nests deeper than `limit`; call it before json.loads."""
    depth = text_depth(text)
    if depth > limit:
        raise ValueError(too_deep(field, depth, limit))


def check_value(value, field: str, limit: int = MAX_JSON_DEPTH) -> None:
    """ValueError (too_deep) when a dict or list nests deeper than `limit`; call it before json.dumps or a walk.
    A value past 100 times the limit is reported as "more than" (it may contain itself)."""
    cap = 100 * limit
    depth = value_depth(value, stop=cap)
    if depth > limit:
        raise ValueError(too_deep(field, f"more than {cap}" if depth > cap else depth, limit))


def deep_path(text: str, limit: int = MAX_JSON_DEPTH) -> Optional[str]:
    """Where JSON text first nests deeper than `limit`, as the path of its first few keys and indices
    ('response_format.json_schema.schema.items...'), or None if it never does. A token scan that stops there:
    for an error message, after `text_depth` found the text too deep."""
    path: list[list] = []  # per open container: [is_object, its current key or index]
    last = None
    for m in _TOKEN.finditer(text):
        t = m.group()
        if t in "[{":
            if len(path) >= limit:
                return _render(path)
            path.append([t == "{", None if t == "{" else 0])
        elif t in "]}":
            if path:
                path.pop()
        elif t == ":":
            if path and path[-1][0]:
                path[-1][1] = last
        elif t == ",":
            if path and not path[-1][0]:
                path[-1][1] += 1
        else:
            last = t[1:-1]
    return None


def _render(path: list[list]) -> str:
    out = ""
    for is_object, key in path[:_MAX_PATH_PARTS]:
        if is_object:
            out += ("." if out else "") + (key if key is not None else "?")[:40]
        else:
            out += f"[{key}]"
    return out + ("..." if len(path) > _MAX_PATH_PARTS else "")
