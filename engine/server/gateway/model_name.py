"""The `model` of an answer to a request that named a LoRA adapter: the adapter's name, as vLLM answers.

The request reaches smg under the base model's name (lora_routes.py: smg routes by `model`, and its worker serves the
base), so smg's answer says the base model, every streamed event too. The front (http_front.py) copies such an answer
through `copy_renamed`, which writes the adapter's name for smg's `"model":"<base>"`: in a body of known length (its
Content-Length recomputed), in a chunked stream (line by line: each SSE event's JSON is one line, so a name is never
cut between two chunks), or in a body that ends when smg closes. A `"model":` inside generated text is escaped in
smg's JSON (`\\"model\\":`), so it never matches.
"""
from __future__ import annotations

import asyncio
import json
from typing import Callable

_FLUSH_BYTES = 1 << 20  # a chunked body with no newline for this long is passed on as it is (renamed)


def renamer(base: str, adapter: str) -> Callable[[bytes], bytes]:
    """bytes -> bytes with smg's `"model":"<base>"` (serde_json's compact form) made `"model":"<adapter>"`."""
    old = b'"model":' + json.dumps(base, ensure_ascii=False).encode()
    new = b'"model":' + json.dumps(adapter, ensure_ascii=False).encode()
    return lambda data: data.replace(old, new)


def header_value(head: bytes, name: bytes):
    """A response head's header value (`name` lowercase), or None."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def with_content_length(head: bytes, length: int) -> bytes:
    """A response head (ending in a blank line) with its Content-Length set to `length`."""
    lines = head[:-4].split(b"\r\n")
    lines = [lines[0]] + [line for line in lines[1:] if line.partition(b":")[0].strip().lower()
                          != b"content-length"] + [b"content-length: " + str(length).encode()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def copy_renamed(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       rename: Callable[[bytes], bytes]) -> None:
    """smg's answer (`head` read, ending in a blank line, with `connection: close` already) to the client, renamed."""
    if (header_value(head, b"transfer-encoding") or b"").lower() == b"chunked":
        writer.write(head)
        pending = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, dropped: smg sends none
                    pass
                break
            pending += (await reader.readexactly(size + 2))[:-2]
            cut = pending.rfind(b"\n") + 1 if len(pending) < _FLUSH_BYTES else len(pending)
            if cut:
                _chunk(writer, rename(pending[:cut]))
                pending = pending[cut:]
            await writer.drain()
        if pending:
            _chunk(writer, rename(pending))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return
    length = header_value(head, b"content-length")
    body = rename(await reader.readexactly(int(length)) if length is not None and length.isdigit()
                  else await reader.read())
    if length is not None:
        head = with_content_length(head, len(body))
    writer.write(head + body)
    await writer.drain()


def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    if data:
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
