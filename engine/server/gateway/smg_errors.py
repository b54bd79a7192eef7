"""smg's error answers made vLLM's, on their way back through the front (http_front.py).

smg (1.13) answers a refused request with OpenAI's shape of its own: `{"error": {"type": "invalid_request_error",
"code": "start_generation_failed", "message": "Failed to start generation: sampling_params.max_tokens=...", "param":
null}}`, the message naming the gRPC field the worker refused (`sampling_params.max_tokens`, `tokenized.input_ids`).
A vLLM client reads vLLM 0.32's: `type` "BadRequestError" / "NotFoundError" / ..., `code` the HTTP status as an
integer, `param` the request field at fault, a message naming HTTP fields (http_wire.error_body). `vllm_error`
rewrites one whole JSON error body; anything else (a body that is not smg's error object) passes unchanged.
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
