"""Bounds on every field of every RPC, read from the wire before the request is parsed.

The prompt and the sampling parameters of a Generate request were checked on the wire (decoding.py); the
other fields were parsed first and refused after: a 60 MB `request_id` (either service), or an Abort with
4 M ids, was parsed into Python strings on the event loop, four such clients raised another stream's worst
token gap from 16 ms to 1.2-3.3 s and RSS from 0.7 to 7.1 GB. Parsing is what costs; a wire scan reads
only tags and lengths. So each method has a budget per field, derived from the same RequestLimits the
parsed request is checked against:

- Generate: `request_id` at most 4 bytes per allowed character; every field that is not the prompt, the
  request id or the sampling parameters (multimodal inputs, KV transfer parameters: all refused after
  parsing anyway) at most OTHER_FIELD_MAX_BYTES;
- Abort: at most --max-abort-ids ids, each at most 4 bytes per allowed request_id character;
- every other method (health, model and server info, loads, reflection, ...): whole messages of at most
  SMALL_REQUEST_MAX_BYTES: they hold a few scalars and short names.

A refusal is one INVALID_ARGUMENT sentence naming the field, the size and the flag that bounds it. Metadata
(headers) are bounded by gRPC itself before any of this (MAX_METADATA_BYTES, the server's channel option).

Refusing unparsed is not enough for the largest: receiving four clients' 60 MB messages (the copies, the
page faults, the senders' own CPU on a shared machine) still stalled other streams for seconds. So the
server also tells gRPC the largest request its limits allow (`receive_limit`, at least RECEIVE_FLOOR_BYTES
for long texts sent with truncate_prompt_tokens, at most --max-message-size): gRPC reads each message's
length from its 5-byte prefix and refuses a longer one (RESOURCE_EXHAUSTED) before receiving it.
"""
from __future__ import annotations

from typing import Callable, Optional

from .limits import (  # noqa: F401 (re-exported: the limits live beside the docs' table, which renders them)
    MAX_METADATA_BYTES, OTHER_FIELD_MAX_BYTES, RECEIVE_FLOOR_BYTES, SMALL_REQUEST_MAX_BYTES, RequestLimits,
)

_UTF8_MAX = 4  # bytes per character

Scan = Callable[..., tuple[list[tuple[int, int, int, int]], bool]]


def request_id_bytes(limits: RequestLimits) -> int:
    return _UTF8_MAX * limits.max_request_id_chars


def channel_options(cfg, max_prompt_bytes: Optional[int], max_model_len: int,
                    mm_bytes: int = 0) -> list[tuple[str, int]]:
    """The gRPC options of both listeners of a server with ServerConfig `cfg`."""
    return [
        ("grpc.max_receive_message_length", receive_limit(cfg.limits, cfg.max_message_size, max_prompt_bytes,
                                                          max_model_len, mm_bytes)),
        ("grpc.max_send_message_length", cfg.max_message_size),
        # Linux gRPC binds with SO_REUSEPORT by default: two servers could share a port unnoticed.
        ("grpc.so_reuseport", 0),
        # Headers are refused by gRPC before any handler (or the key check) sees them.
        ("grpc.max_metadata_size", MAX_METADATA_BYTES), ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
    ]


def receive_limit(limits: RequestLimits, max_message_size: int, max_prompt_bytes: Optional[int],
                  max_model_len: int, mm_bytes: int = 0) -> int:
    """The largest message the server receives: what the largest request within the limits needs (a prompt
    that fits, as text or as token ids of at most 5 bytes each, the largest sampling parameters, request id
    and the other fields), at least RECEIVE_FLOOR_BYTES, at most `max_message_size`."""
    prompt = max(max_prompt_bytes or 0, 5 * max_model_len)
    largest = (prompt + limits.max_sampling_params_bytes() + request_id_bytes(limits) + 8 * OTHER_FIELD_MAX_BYTES
               + mm_bytes)  # an image model's preprocessed pixels (Serving.mm_bytes)
    return min(max_message_size, max(RECEIVE_FLOOR_BYTES, largest))


def generate_field_refusal(fields, names: dict[int, str], bounded: set[int], request_id: int,
                           limits: RequestLimits, wider: Optional[dict[int, int]] = None) -> Optional[str]:
    """Why a Generate request's scanned top-level `fields` (number, wire type, offset, size) are too large, or
    None: `request_id` is the number of that field; `bounded` the fields checked elsewhere (prompt, ids,
    sampling parameters); `names` field names by number; `wider`: fields with a budget of their own (an image
    model's mm_inputs, by number)."""
    wider = wider or {}
    sizes: dict[int, int] = {}
    for number, _, _, size in fields:
        sizes[number] = sizes.get(number, 0) + size
    rid = sizes.get(request_id, 0)
    if rid > request_id_bytes(limits):
        return (f"request_id is {rid} bytes: it may have at most {limits.max_request_id_chars} characters "
                f"({request_id_bytes(limits)} bytes of UTF-8; --max-request-id-chars).")
    for number, size in sizes.items():
        most = wider.get(number, OTHER_FIELD_MAX_BYTES)
        if number not in bounded and number != request_id and size > most:
            name = names.get(number, f"field {number}")
            return f"{name} is {size} bytes: at most {most} are accepted in that field."
    return None


class AbortCheck:
    """An AbortRequest's ids, counted and measured on the wire (field 1, `request_ids`, on both services)."""

    def __init__(self, limits: RequestLimits, scan: Scan):
        self.limits, self.scan = limits, scan

    def __call__(self, data: bytes) -> Optional[str]:
        lim = self.limits
        fields, _ = self.scan(data, lim.max_abort_ids + 1)  # the parser judges bytes that are not protobuf
        if len(fields) > lim.max_abort_ids:
            return (f"AbortRequest.request_ids has more than {lim.max_abort_ids} ids: at most "
                    f"{lim.max_abort_ids} per Abort (--max-abort-ids).")
        for i, (number, _, _, size) in enumerate(fields):
            if number == 1 and size > request_id_bytes(lim):
                return (f"AbortRequest.request_ids[{i}] is {size} bytes: a request_id has at most "
                        f"{lim.max_request_id_chars} characters (--max-request-id-chars).")
        return None


class SmallCheck:
    """Any other method's request: a few scalars and short names, so at most SMALL_REQUEST_MAX_BYTES."""

    def __init__(self, method: str):
        self.method = method

    def __call__(self, data: bytes) -> Optional[str]:
        if len(data) > SMALL_REQUEST_MAX_BYTES:
            return (f"the request to {self.method} is {len(data)} bytes: its message holds a few short fields, "
                    f"at most {SMALL_REQUEST_MAX_BYTES} bytes are accepted.")
        return None
