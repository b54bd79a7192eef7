"""smg's error answers made vLLM's, on their way back through the front (http_front.py).

smg (1.13) answers a refused request with OpenAI's shape of its own: `{"error": {"type": "invalid_request_error",
"code": "start_generation_failed", "message": "Failed to start generation: sampling_params.max_tokens=...", "param":
null}}`, the message naming the gRPC field the worker refused (`sampling_params.max_tokens`, `tokenized.input_ids`).
A vLLM client reads vLLM 0.32's: `type` "BadRequestError" / "NotFoundError" / ..., `code` the HTTP status as an
integer, `param` the request field at fault, a message naming HTTP fields (http_wire.error_body). `vllm_error`
rewrites one whole JSON error body; anything else (a body that is not smg's error object) passes unchanged. In a
stream that has begun (HTTP 200 sent), an error is an event: `StreamedErrors` rewrites smg's into vLLM's `data:
{"error": {...}}` and ends the stream with `data: [DONE]` as vLLM's does.
"""
from __future__ import annotations

import json
import re
from typing import Optional

from .http_wire import METHOD_NOT_ALLOWED_BODY, NOT_FOUND_BODY, error_object

# The most bytes of an error body read to rewrite it: smg's are a few hundred; a larger body is passed on as it is.
MAX_ERROR_BYTES = 64 << 10
_SMG_PREFIXES = ("Failed to start generation: ",)
# gRPC field names (the worker's refusals, as the gRPC services spell them) -> the HTTP request's fields.
# (the Python API's spelling, `SamplingParams.max_tokens`, too: the engine's own refusals name it so.)
_GRPC_FIELD = re.compile(r"\b(?:sampling_params|SamplingParams)\.([a-z_]+)")
_GRPC_PROMPT = "tokenized.input_ids"


# What vLLM's FastAPI answers for a path or a method no route has, whoever refuses it (the front, or smg).
_ROUTING_BODIES = {404: NOT_FOUND_BODY, 405: METHOD_NOT_ALLOWED_BODY}
_SMG_ROUTING = "Invalid URL"  # how smg's message begins then (a 404 for an unknown model is an error object)


def http_message(message: str) -> str:
    """`message` with gRPC field names made the HTTP request's (`sampling_params.max_tokens` -> `max_tokens`,
    `tokenized.input_ids` -> `prompt`) and smg's own prefix dropped."""
    for prefix in _SMG_PREFIXES:
        if message.startswith(prefix):
            message = message[len(prefix):]
    return _GRPC_FIELD.sub(r"\1", message).replace(_GRPC_PROMPT, "prompt")


def http_param(message: str, param: Optional[str]) -> Optional[str]:
    """The request field an error is about: smg's `param` when it names one, else the first gRPC field its message
    names (`sampling_params.max_tokens=...` -> `max_tokens`), else None."""
    if isinstance(param, str) and param:
        return http_message(param)
    found = _GRPC_FIELD.search(message)
    if found is not None:
        return found.group(1)
    return "prompt" if _GRPC_PROMPT in message else None


def vllm_error(status: int, body: bytes) -> Optional[bytes]:
    """smg's error body (`body`, answered with HTTP `status`) in vLLM's shape, or None when it is not an error
    object (then it is passed on unchanged)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return None
    message = err["message"]
    if status in _ROUTING_BODIES and message.startswith(_SMG_ROUTING):
        return _ROUTING_BODIES[status]  # a method or path smg has no route for (GET /v1/chat/completions)
    return json.dumps(error_object(http_message(message), http_param(message, err.get("param")), status)).encode()


def stream_error(payload: bytes) -> Optional[bytes]:
    """One streamed event's JSON (`payload`, a `data:` line's) in vLLM's error shape when it is smg's error event
    (`{"error": {"message", "type", "code", ...}}` or `{"error": "<message>"}`), else None (passed on unchanged).
    Its status: `error.code` when an HTTP error status, else 500 (the answer began with 200: the failure is the
    server's, as vLLM's GenerationError is)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, str):
        err = {"message": err}
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return None
    code = err.get("code")
    status = code if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599 else 500
    message = err["message"]
    return json.dumps(error_object(http_message(message), http_param(message, err.get("param")), status)).encode()


class StreamedErrors:
    """smg's error events in a relayed chat or completions stream made vLLM's: each `data: {"error": ...}` line in
    vLLM's shape (stream_error), and `data: [DONE]` after the last event when smg ended a stream that had an error
    without it (vLLM's stream generators send both: `data: {"error": ...}` then `data: [DONE]`). Called with whole
    lines (model_name.copy_renamed); `end()` is what follows smg's last byte."""

    def __init__(self) -> None:
        self.errored = self.done = False

    def __call__(self, block: bytes) -> bytes:
        if b"error" not in block and b"[DONE]" not in block:  # the common event: no line to look at
            return block
        lines = block.split(b"\n")
        for i, line in enumerate(lines):
            body = line.rstrip(b"\r")
            if not body.startswith(b"data:"):
                continue
            payload = body[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            new = stream_error(payload) if b"error" in payload else None
            if new is not None:
                lines[i] = b"data: " + new + line[len(body):]
                self.errored = True
        return b"\n".join(lines)

    def end(self) -> bytes:
        return b"data: [DONE]\n\n" if self.errored and not self.done else b""
