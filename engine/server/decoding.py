"""Decoding requests: undecodable ones get INVALID_ARGUMENT, large ones give their memory back.

grpc parses a request with the method's deserializer before any handler
runs; when that raises (corrupt bytes, a string field that is not UTF-8),
grpc answers UNKNOWN ("Unexpected error"), which tells a client nothing and
reads like a server fault. This interceptor wraps every method's deserializer
so a parse failure becomes a marker object, and the method's behaviour answers
INVALID_ARGUMENT for it, on every service.

A Generate request that its wire form alone proves too large (sampling_params
beyond anything the limits allow, a prompt longer than can fit, a request_id
longer than allowed) is refused the same way, before it is parsed: parsing 5 M
stop_token_ids takes 40 ms of the event loop, a 16 MB prompt's parse and str 6
to 35 ms. So is an Abort with too many or too long ids, and any other method's
message over a small bound (wire_bounds.py holds those budgets).

The deserializer also sees each request's size. A large one (a 16 MB prompt)
passes through several 16 MB buffers on several threads; glibc keeps such
freed memory in its per-thread arenas, so RSS would rise by a few hundred MB
and stay. After a large request, `malloc_trim` hands it back (once a second
at most, on a timer thread, after the request is gone).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import inspect
import logging
import threading

import grpc

from ..contract.safe_text import shown
from .limits import RequestLimits
from .method_handler import handler_like
from .wire_bounds import AbortCheck, SmallCheck, generate_field_refusal

logger = logging.getLogger(__name__)

LARGE_REQUEST_BYTES = 1 << 20  # after one this large, memory is given back
PRECHECK_MIN_BYTES = 4096  # smaller requests parse in microseconds: not worth a scan
_TRIM_DELAY_S = 1.0


class _Trimmer:
    """Calls glibc's malloc_trim(0) a little after it is asked, coalescing requests; a no-op elsewhere."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending = False
        try:
            self._trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            self._trim = None

    def soon(self) -> None:
        if self._trim is None:
            return
        with self._lock:
            if self._pending:
                return
            self._pending = True
        timer = threading.Timer(_TRIM_DELAY_S, self._run)
        timer.daemon = True
        timer.start()

    def _run(self) -> None:
        with self._lock:
            self._pending = False
        self._trim(0)  # ctypes releases the GIL meanwhile


class _Refused:
    """What the deserializer returns instead of a request it refuses; `message` is the INVALID_ARGUMENT text."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


# A GenerateRequest has at most 11 top-level fields (vllm's; moelink's has 4), and a serializer writes each
# once: the only repeated one, extra_mm_inputs, holds one batch per modality (one is taken, beside mm_inputs). So
# a Generate request with this many top-level occurrences is padding (placed there to push the real fields past
# the scan) and is refused; for other messages a scan just stops here.
_SCAN_FIELDS = 64
_MAX_VARINT_BYTES = 5  # a packed uint32 token id takes 1 to 5 bytes


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError past the end: the scan stops
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def scan(data: bytes | memoryview, limit: int = _SCAN_FIELDS) -> tuple[list[tuple[int, int, int, int]], bool]:
    """The fields of a serialized message, read from the wire without parsing it: (number, wire type, offset,
    size) of each among the first `limit` (size 0 unless length-delimited), and whether that was all of
    them. O(fields scanned), whatever the message's size."""
    fields, pos = [], 0
    try:
        for _ in range(limit):
            if pos >= len(data):
                return fields, True
            key, pos = _varint(data, pos)
            wire, size, start = key & 7, 0, pos
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                size, start = _varint(data, pos)
                size = min(size, len(data) - start)
                pos = start + size
            else:
                return fields, False  # groups, or not protobuf: the parser says what is wrong
            fields.append((key >> 3, wire, start, size))
    except IndexError:
        return fields, False
    return fields, pos >= len(data)


def field_bytes(data: bytes, number: int) -> int:
    """Bytes of top-level field `number`, summed over its occurrences (protobuf merges repeated occurrences
    of a message field): a lower bound of what the parser would build, even from a partial scan."""
    return sum(size for n, _, _, size in scan(data)[0] if n == number)


def min_ids(data: bytes | memoryview, number: int) -> int:
    """At least how many entries the repeated uint32 field `number` of a serialized message has: a packed run of
    k bytes holds at least k/5 of them (ceiling), an unpacked entry is one. Reads only the tags."""
    count = 0
    for n, wire, _, size in scan(data)[0]:
        if n == number:
            count += -(-size // _MAX_VARINT_BYTES) if wire == 2 else 1
    return count


class _GenerateCheck:
    """What a Generate request's wire form alone proves too large, refused before it is parsed (the parse
    and the text's str are most of what a hostile request would cost the event loop):
    - sampling_params larger than any within the limits (5 M stop_token_ids: a 40 ms parse);
    - a text prompt of more bytes than can fit max_model_len (Serving.text_refusal), or token ids provably as
      many as max_model_len or more (Serving.ids_refusal), unless the request asks for truncation (VllmEngine's
      truncate_prompt_tokens, inside sampling_params);
    - _SCAN_FIELDS top-level field occurrences or more, which no serializer writes (padding)."""

    def __init__(self, pb, text_field: str, ids_field: str, truncate_field: str | None, limits: RequestLimits,
                 text_refusal, ids_refusal, mm_bytes: int = 0):
        fields = pb.GenerateRequest.DESCRIPTOR.fields_by_name
        self.sp = fields["sampling_params"].number
        self.text, self.text_name = fields[text_field].number, text_field
        ids_msg, ids_list = ids_field.split(".")
        self.ids, self.ids_name = fields[ids_msg].number, ids_field
        self.ids_entry = fields[ids_msg].message_type.fields_by_name[ids_list].number
        self.ids_refusal = ids_refusal
        self.inputs = {f.number for f in fields[text_field].containing_oneof.fields}
        self.request_id = fields["request_id"].number
        self.names = {f.number: f.name for f in pb.GenerateRequest.DESCRIPTOR.fields}
        self.bounded = self.inputs | {self.sp}  # checked below
        # An image model's preprocessed pixels (VllmEngine's mm_inputs; a second modality's batch, a video, in
        # extra_mm_inputs) get the budget its limits allow.
        self.wider = {fields[f].number: mm_bytes for f in ("mm_inputs", "extra_mm_inputs")
                      if mm_bytes and f in fields}
        self.truncate = None if truncate_field is None else \
            pb.SamplingParams.DESCRIPTOR.fields_by_name[truncate_field].number
        self.limits, self.sp_limit, self.text_refusal = limits, limits.max_sampling_params_bytes(), text_refusal

    def __call__(self, data: bytes) -> str | None:
        fields, complete = scan(data)
        if not complete and len(fields) == _SCAN_FIELDS:
            return (f"the request has more than {_SCAN_FIELDS - 1} top-level field occurrences: a GenerateRequest "
                    "has a dozen fields at most, each written once.")
        refusal = generate_field_refusal(fields, self.names, self.bounded, self.request_id, self.limits, self.wider)
        if refusal is not None:
            return refusal
        sp = [(start, size) for n, _, start, size in fields if n == self.sp]
        sp_bytes = sum(size for _, size in sp)
        if sp_bytes > self.sp_limit:
            lim = self.limits
            return (f"sampling_params is {sp_bytes} bytes: no request within this server's limits needs more than "
                    f"{self.sp_limit} ({lim.max_stop_strings} stop strings of {lim.max_stop_string_chars} "
                    f"characters, {lim.max_stop_token_ids} stop_token_ids: --max-stop-strings, "
                    "--max-stop-string-chars, --max-stop-token-ids).")
        # The last field of the input oneof wins; only a complete scan knows which is last.
        inputs = [(n, start, size) for n, _, start, size in fields if n in self.inputs]
        if not complete or not inputs or inputs[-1][0] not in (self.text, self.ids):
            return None
        view = memoryview(data)
        if self.truncate is not None:
            for start, size in sp:
                sub, sub_complete = scan(view[start:start + size])
                if not sub_complete or any(n == self.truncate for n, _, _, _ in sub):
                    return None  # the tail of a long prompt may be asked for
        number, start, size = inputs[-1]
        if number == self.text:
            return self.text_refusal(self.text_name, size)
        # Earlier occurrences of the same message field would be merged in (more ids): the last alone is a
        # lower bound.
        return self.ids_refusal(self.ids_name, min_ids(view[start:start + size], self.ids_entry))


def _no_refusal(field: str, amount: int) -> None:
    return None


def _safe(deserialize, method: str, trimmer: _Trimmer, precheck):
    def parse(data: bytes):
        if len(data) >= LARGE_REQUEST_BYTES:
            trimmer.soon()
        refusal = precheck(data) if precheck is not None and len(data) > PRECHECK_MIN_BYTES else None
        if refusal is not None:
            return _Refused(refusal)
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or whatever a deserializer raises on bad bytes
            return _Refused(f"the request to {method} could not be decoded ({shown(str(exc), quote=False)}): "
                                "it must be a valid protobuf message whose string fields are valid UTF-8.")

    return parse


def _wrap(handler: grpc.RpcMethodHandler, method: str, trimmer: _Trimmer, precheck) -> grpc.RpcMethodHandler:
    behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

    async def refuse(context, bad):
        logger.info("%s refused: INVALID_ARGUMENT %s", method, bad.message)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)

    if handler.request_streaming:
        async def requests(iterator, context):
            async for request in iterator:
                if isinstance(request, _Refused):
                    await refuse(context, request)
                yield request

        if inspect.isasyncgenfunction(behaviour):
            async def wrapped(iterator, context):
                async for response in behaviour(requests(iterator, context), context):
                    yield response
        else:
            async def wrapped(iterator, context):  # type: ignore[misc]  # one wrapper per handler kind
                return await behaviour(requests(iterator, context), context)
    elif inspect.isasyncgenfunction(behaviour):
        async def wrapped(request, context):
            if isinstance(request, _Refused):
                await refuse(context, request)
            async for response in behaviour(request, context):
                yield response
    else:
        async def wrapped(request, context):  # type: ignore[misc]  # one wrapper per handler kind
            if isinstance(request, _Refused):
                await refuse(context, request)
            return await behaviour(request, context)

    return handler_like(handler, wrapped, _safe(handler.request_deserializer, method, trimmer, precheck))


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    """INVALID_ARGUMENT (not UNKNOWN) for a request its method cannot parse, or that its wire form shows too
    large to accept; memory given back after large requests."""

    def __init__(self, limits: RequestLimits, text_refusal=_no_refusal, ids_refusal=_no_refusal, mm_bytes: int = 0):
        """`text_refusal(field, num_bytes)`: why a text prompt of that many bytes cannot fit, or None;
        `ids_refusal(field, num_ids)`: why a prompt of at least that many token ids cannot fit, or None;
        `mm_bytes`: the most bytes of preprocessed images a request may carry (0: a text model)."""
        from smg_grpc_proto.generated import vllm_engine_pb2

        from .gen import moelink_v1_pb2

        self._trimmer = _Trimmer()
        self._prechecks = {
            f"/{pb.DESCRIPTOR.services_by_name[service].full_name}/Generate":
                _GenerateCheck(pb, text, ids, truncate, limits, text_refusal, ids_refusal, mm_bytes)
            for pb, service, text, ids, truncate in (
                (moelink_v1_pb2, "Generation", "prompt", "prompt_token_ids.ids", None),
                (vllm_engine_pb2, "VllmEngine", "text", "tokenized.input_ids", "truncate_prompt_tokens"))}
        for pb, service in ((moelink_v1_pb2, "Generation"), (vllm_engine_pb2, "VllmEngine")):
            self._prechecks[f"/{pb.DESCRIPTOR.services_by_name[service].full_name}/Abort"] = AbortCheck(limits, scan)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}  # per method, made once

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
            return handler  # a synchronous handler (none of ours): left as grpc runs it
        # Every other method's messages are small (wire_bounds.SmallCheck): bounded before parsing too.
        wrapped = _wrap(handler, method, self._trimmer, self._prechecks.get(method) or SmallCheck(method))
        self._wrapped[method] = (handler, wrapped)
        return wrapped
