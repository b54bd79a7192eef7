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
from typing import Callable, Optional

_FLUSH_BYTES = 1 << 20  # a chunked body with no newline for this long is passed on as it is (renamed)
_READ_BYTES = 64 << 10


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
                       rename: Callable[[bytes], bytes], end: Optional[Callable[[], bytes]] = None) -> None:
    """smg's answer (`head` read, ending in a blank line, with `connection: close` already) to the client, renamed
    (`rename` is given whole lines, so it may be any line-wise rewrite: smg_errors.StreamedErrors too); `end()`: bytes
    written after the last of smg's (an ending smg left out)."""
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
            pending = await _flush_lines(pending, rename, lambda data: _chunk(writer, data), writer)
        _chunk(writer, (rename(pending) if pending else b"") + (end() if end is not None else b""))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return
    length = header_value(head, b"content-length")
    if length is None or not length.isdigit():  # a body that ends when smg closes: passed on as it comes
        writer.write(head)
        pending = b""
        while data := await reader.read(_READ_BYTES):
            pending = await _flush_lines(pending + data, rename, writer.write, writer)
        writer.write((rename(pending) if pending else b"") + (end() if end is not None else b""))
        await writer.drain()
        return
    body = rename(await reader.readexactly(int(length))) + (end() if end is not None else b"")
    writer.write(with_content_length(head, len(body)) + body)
    await writer.drain()


async def _flush_lines(pending: bytes, rename: Callable[[bytes], bytes], write: Callable[[bytes], None],
                       writer: asyncio.StreamWriter) -> bytes:
    """The whole lines of `pending` renamed and written (all of it past _FLUSH_BYTES without a newline); the rest."""
    cut = pending.rfind(b"\n") + 1 if len(pending) < _FLUSH_BYTES else len(pending)
    if cut:
        write(rename(pending[:cut]))
        pending = pending[cut:]
    await writer.drain()
    return pending


def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    if data:
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
