"""The front's relay to smg (http_front.py routes, this sends): one request to smg on loopback, its answer back.

How: the request (read whole by the front) is sent to smg with `connection: close` and the front's relay id in
hangups.RELAY_HEADER (smg makes it the gRPC request id's prefix; a client's own copy of that header is dropped), and
smg's answer is copied back as it comes (streams included) until smg closes, its head with `connection: close`.

On the way back: a 503 `tokenizer_not_ready` is not copied but the request sent again (quirks.
MODELS_BEFORE_TOKENIZER: NOT_READY_RETRY_S); smg's JSON error answers are rewritten into vLLM's shape
(smg_errors.vllm_error), and so are the error events of a stream that has begun (smg_errors.StreamedErrors: vLLM's
`data: {"error": {...}}` then `data: [DONE]`); an answer to a request that named a LoRA adapter says the adapter as
its model (model_name.py). A client that goes away before smg's answer has ended is reported (`on_hangup`), and the
server ends the request itself: smg would not (hangups.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable, Optional

import h11

from .hangups import RELAY_HEADER, new_relay_id
from .http_wire import (BoundedWriter, Upstream, closing_head, copy_stream, error_body, header_of, stall_of, status_of,
                        until_eof, write_answer)
from .lora_routes import forget_adapter, note_adapter
from .model_name import copy_renamed, header_value, renamer, with_content_length
from .openai_fields import CHAT_PATH, COMPLETIONS_PATH
from .quirks import tokenizer_ready, vllm_reasoning_key
from .smg_errors import MAX_ERROR_BYTES, StreamedErrors, vllm_error
from .tool_calls import forget, note_one_call

# The relay's lines are the front's (operators filter the OpenAI port's lines by that logger's name).
logger = logging.getLogger(__package__ + ".http_front")

MAX_HEAD_BYTES = 64 << 10
CONNECT_RETRY_S = (0.1, 0.3)  # a failed connect to smg is tried again after these, unless smg is down
# smg (1.13) may answer 503 `tokenizer_not_ready` for a moment after it lists the model (quirks.
# MODELS_BEFORE_TOKENIZER), also after a restart: such an answer comes before any engine work, so the front sends
# the (buffered) request again, every NOT_READY_POLL_S for at most NOT_READY_RETRY_S, rather than hand a client a
# 503 for a server that said it was on.
NOT_READY_RETRY_S = 10.0
NOT_READY_POLL_S = 0.2
# Hop-by-hop headers the front sets itself (RFC 9110 section 7.6.1), and the framing it recomputes.
_DROPPED = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade", b"content-length",
            b"transfer-encoding", RELAY_HEADER.encode()}
# The start of a relay id without the client's X-Request-Id: the id OpenAI (and smg) give each kind of answer.
_ID_KINDS = {CHAT_PATH: "chatcmpl", COMPLETIONS_PATH: "cmpl"}
# The routes whose streams are vLLM's (an error event rewritten into vLLM's shape): smg's other APIs (Responses,
# Messages) stream error events of their own formats, passed on as they are.
_VLLM_STREAMS = (CHAT_PATH, COMPLETIONS_PATH)


class SmgRelay:
    """Relays requests to smg on 127.0.0.1:upstream_port (the front's `not_serving`, `on_hangup` and `local`: see
    HttpFront)."""

    def __init__(self, upstream_port: int, not_serving: Optional[Callable[[], Optional[str]]] = None,
                 on_hangup: Optional[Callable[[str], Awaitable[object]]] = None, local=None):
        self.upstream_port = upstream_port
        self.not_serving = not_serving
        self.on_hangup = on_hangup
        self.local = local

    async def relay(self, conn, request: h11.Request, body: bytes, reader, writer, method: Optional[bytes] = None,
                    target: Optional[bytes] = None, one_call: bool = False, adapter: Optional[str] = None) -> None:
        """Relay `request` (as `method` `target` when given) with `body` to smg, and its answer back. `one_call`:
        the request asks for one required tool call (noted for the engine under its relay id, tool_calls.py);
        `adapter`: the LoRA adapter its `model` named (noted the same way, lora_routes.py)."""
        method, target = method or request.method, target or request.target
        if stall_of(conn) is not None:  # a client that reads nothing of smg's answer: ended after the stall bound
            writer = BoundedWriter(writer, stall_of(conn))
        try:
            up = Upstream(*await self._connect_upstream())
        except OSError as exc:
            await self._unreachable(conn, writer, exc, method == b"HEAD")
            return
        path = target.split(b"?", 1)[0].decode("latin-1")
        relay_id = new_relay_id(_ID_KINDS.get(path, "req"), header_of(request, b"x-request-id"))
        if one_call:
            note_one_call(relay_id)
        if adapter is not None:
            note_adapter(relay_id, adapter)
        # Watched from the start, not from smg's first byte: before it, a grammar may compile for many seconds.
        gone = asyncio.ensure_future(until_eof(reader))
        answer = None
        try:
            head = [method + b" " + target + b" HTTP/1.1"]
            head += [name + b": " + value for name, value in request.headers if name not in _DROPPED]
            head += [RELAY_HEADER.encode() + b": " + relay_id.encode(), b"content-length: " + str(len(body)).encode(),
                     b"connection: close"]
            up.request = b"\r\n".join(head) + b"\r\n\r\n" + body
            up.writer.write(up.request)
            # An adapter's answer says the adapter as its model, as vLLM's does (model_name.py).
            rename = renamer(self.local.base_name, adapter) if adapter is not None else None
            if path == CHAT_PATH:  # smg's reasoning_content named vLLM's reasoning (quirks.vllm_reasoning_key)
                rename = vllm_reasoning_key if rename is None else _then(rename, vllm_reasoning_key)
            answer = asyncio.ensure_future(self._answer_from(up, writer, rename, path in _VLLM_STREAMS))
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forget(relay_id)
            forget_adapter(relay_id)
            gone.cancel()
            if answer is not None and not answer.done():
                answer.cancel()
            await asyncio.gather(*(t for t in (answer, gone) if t is not None), return_exceptions=True)
            up.writer.close()
            with contextlib.suppress(Exception):
                await up.writer.wait_closed()
            # Unless smg's whole answer reached the client, no one reads the rest: the server ends the request.
            if answer is None or answer.cancelled() or answer.exception() is not None:
                await self._hung_up(relay_id)
        if not answer.cancelled():
            answer.result()  # smg's own failure (it closed early, a head over the limit): the caller's to handle

    async def _unreachable(self, conn, writer, exc: OSError, head_only: bool) -> None:
        """smg could not be reached: 503 only while the supervisor has smg down (and restarts it: it logs each
        restart and its reason); any other failure to reach smg is the front's own error, said and logged as such
        (issue 54 item 8: a 503 "is restarting" was answered for any connect error, with no restart at all)."""
        reason = self.not_serving() if self.not_serving is not None else None
        if reason is not None:
            await write_answer(conn, writer, 503, error_body(f"{reason} Retry in a few seconds.", None, 503),
                               head_only=head_only)
            return
        logger.error("the OpenAI front could not reach the smg gateway on 127.0.0.1:%d (%s), and no restart of "
                     "it is under way: answered 502", self.upstream_port, exc)
        await write_answer(conn, writer, 502, error_body(f"the OpenAI gateway (smg) on 127.0.0.1:{self.upstream_port} "
                                                         f"could not be reached: {exc}.", None, 502),
                           head_only=head_only)

    async def _answer_from(self, up: Upstream, writer: asyncio.StreamWriter,
                           rename: Optional[Callable[[bytes], bytes]] = None, vllm_stream: bool = False) -> None:
        """The request sent on (`up.writer` holds it), then smg's answer copied to the client as it comes until smg
        closes; its head with `connection: close`. A 503 `tokenizer_not_ready` is not copied: the request is sent
        again on a new connection (NOT_READY_RETRY_S). `vllm_stream`: a stream of vLLM's routes, whose error events
        are rewritten (smg_errors.StreamedErrors)."""
        deadline = asyncio.get_running_loop().time() + NOT_READY_RETRY_S
        while True:
            await up.writer.drain()
            head = await up.reader.readuntil(b"\r\n\r\n")
            if status_of(head) != 503 or asyncio.get_running_loop().time() >= deadline:
                break
            # A 503's body is small and ends the connection (the request said `connection: close`).
            body = await up.reader.read(MAX_HEAD_BYTES)
            if tokenizer_ready(503, body):
                writer.write(closing_head(head) + body)
                await copy_stream(up.reader, writer)
                return
            up.writer.close()
            await asyncio.sleep(NOT_READY_POLL_S)
            up.reader, up.writer = await self._connect_upstream()
            up.writer.write(up.request)
        if status_of(head) >= 400 and await _rewrite_error(head, up.reader, writer):
            return
        if vllm_stream and b"text/event-stream" in (header_value(head, b"content-type") or b"").lower():
            errors = StreamedErrors()
            both = errors if rename is None else (lambda data: errors(rename(data)))
            await copy_renamed(closing_head(head), up.reader, writer, both, errors.end)
            return
        if rename is not None:
            await copy_renamed(closing_head(head), up.reader, writer, rename)
            return
        writer.write(closing_head(head))
        await copy_stream(up.reader, writer)

    async def _connect_upstream(self):
        """A connection to smg. A failed connect is tried again (CONNECT_RETRY_S) unless the supervisor says smg
        is down: smg that just exited is seen by `not_serving` a moment later, and a transient error is not
        worth a client's error."""
        for delay in CONNECT_RETRY_S + (None,):
            try:
                return await asyncio.open_connection("127.0.0.1", self.upstream_port, limit=MAX_HEAD_BYTES)
            except OSError:
                if delay is None or (self.not_serving is not None and self.not_serving() is not None):
                    raise
            await asyncio.sleep(delay)

    async def _hung_up(self, relay_id: str) -> None:
        if self.on_hangup is None:
            return
        try:
            await self.on_hangup(relay_id)
        except Exception:  # a bug there must not turn into a connection error here
            logger.exception("ending the request of an HTTP client that hung up failed (relay id %s)", relay_id)


def _then(first: Callable[[bytes], bytes], second: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    return lambda data: second(first(data))


async def _rewrite_error(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """smg's JSON error answer (`head` read) to the client in vLLM's shape (smg_errors.py); whether it was one.
    Only a body of known length, at most MAX_ERROR_BYTES: smg's errors are; anything else is copied as it is."""
    length = header_value(head, b"content-length")
    kind = header_value(head, b"content-type") or b""
    if length is None or not length.isdigit() or int(length) > MAX_ERROR_BYTES or b"json" not in kind.lower():
        return False
    body = await reader.readexactly(int(length))
    new = vllm_error(status_of(head), body)
    if new is not None:
        head = with_content_length(head, len(new))
    writer.write(closing_head(head) + (body if new is None else new))
    await writer.drain()
    return True


__all__ = ["CONNECT_RETRY_S", "MAX_HEAD_BYTES", "NOT_READY_POLL_S", "NOT_READY_RETRY_S", "SmgRelay"]
