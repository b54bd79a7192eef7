"""SGLang's native `POST /generate` on the HTTP port, answered from the engine beside the front (docs/rl.md#over-http).

slime, verl and AReaL drive an SGLang generator with it: token ids in (`input_ids`), and per generated token its id
and logprob (`meta_info.output_token_logprobs`) and, for rollout routing replay, the experts every forwarded
position was routed to (`meta_info.routed_experts`). smg (1.13) has a /generate of its own, but it reaches the
worker by the VllmEngine protocol, which has no routed-experts field (nor prompt logprobs), and the front never
relayed it; so the front answers it itself, in SGLang's request and response shapes, through the same Serving the
gRPC services use (admission limits, request registry, aborts). Beside it SGLang's `POST /abort_request`, which
slime sends each worker to end a rollout: `{"rid"}` ends that request; `{"abort_all": true}` ends every client's,
and is taken only from a server started with --enable-weight-updates (403 naming it), as the cache flush.

Request: `text` or `input_ids` (one prompt; a batch is refused naming the field), `sampling_params` (SGLang's names,
SAMPLING below), `return_logprob`, `logprob_start_len` (-1: output tokens only), `top_logprobs_num`,
`return_routed_experts`, `stream`, `rid`, `lora_path` (a served adapter's name), `model`. Any other field, or a
sampling key not listed, is refused (400 naming it), never ignored. Answer: `{"text", "output_ids", "meta_info": {"id",
"finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version", "e2e_latency", ...}}`;
streamed, the same object so far (text, ids and logprobs cumulative: SGLang's default) per `data:` event, then
`data: [DONE]`.

`meta_info.routed_experts`: SGLang's encoding, base64 of the flat little-endian int32 array [prompt + generated - 1,
MoE layers, top_k], with `routed_experts_dtype` "int32" (SGLang's key). Not the gRPC path's int16: slime and the
RL drivers built on SGLang decode the string as int32 without reading a dtype, and would misread narrower ids.
"""
from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from ...contract.safe_text import shown
from ...contract.sampling_params import SamplingParams
from .json_body import json_flag, json_object
from .openai_fields import HttpFieldError

GENERATE_PATH = "/generate"
# SGLang's `POST /abort_request` {"rid"} or {"abort_all": true}: what slime sends every worker to end a rollout.
ABORT_PATH = "/abort_request"
PATHS = (GENERATE_PATH, ABORT_PATH)
FIELDS = ("text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
          "return_routed_experts", "stream", "rid", "lora_path", "model")
# SGLang's sampling key -> (moelink SamplingParams field, JSON kind).
SAMPLING = {"max_new_tokens": ("max_tokens", "int"), "min_new_tokens": ("min_tokens", "int"),
            "temperature": ("temperature", "number"), "top_p": ("top_p", "number"), "top_k": ("top_k", "int"),
            "min_p": ("min_p", "number"), "repetition_penalty": ("repetition_penalty", "number"),
            "presence_penalty": ("presence_penalty", "number"), "frequency_penalty": ("frequency_penalty", "number"),
            "stop": ("stop", "strs"), "stop_token_ids": ("stop_token_ids", "ints"),
            "ignore_eos": ("ignore_eos", "bool"), "skip_special_tokens": ("skip_special_tokens", "bool"),
            "no_stop_trim": ("include_stop_str_in_output", "bool"), "n": ("n", "int"), "seed": ("seed", "int"),
            "sampling_seed": ("seed", "int")}
SGLANG_MAX_NEW_TOKENS = 128  # SGLang's default when sampling_params has none
# gRPC status (serving.status_for) -> HTTP status.
_HTTP = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 403, "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429,
         "CANCELLED": 499, "UNAVAILABLE": 503}


@dataclass
class Streamed:
    """An answer written as it comes (server-sent events): the front sends the head, then each chunk; closing
    `chunks` ends the request in the engine."""

    chunks: AsyncIterator[bytes]
    # Ends the request in the engine: what the front calls last, whether or not `chunks` was ever started (closing
    # a generator that never ran does not run its cleanup).
    stop: Callable[[], Awaitable[None]]
    content_type: bytes = b"text/event-stream"


@dataclass(frozen=True)
class _Request:
    prompt: Any  # text or token ids
    field: str
    params: SamplingParams
    rid: str
    lora: Optional[str]
    stream: bool
    logprob_start: Optional[int]  # the first prompt position whose logprob is returned, or None


class GenerateRoute:
    """Answers `POST /generate` from a Serving (serving.py) on the server's loop."""

    def __init__(self, serving):
        self.s = serving

    async def answer(self, method: bytes, path: str, body: bytes, query: str = ""):
        """(HTTP status, JSON body), a Streamed answer, or None for another path."""
        if path not in PATHS:
            return None
        if method != b"POST":
            return 405, _error(f"{path} takes POST (a JSON body), not {method.decode('latin-1')}.", None, 405)
        if path == ABORT_PATH:
            return await self._abort(body)
        try:
            req = self._read(body)
            processed = await self.s.prepare(req.rid, req.prompt, req.params, req.field, lora=(
                self.s.adapter(req.lora, "lora_path") if req.lora else None))
            if req.logprob_start is not None and req.logprob_start >= len(processed.prompt_token_ids):
                raise HttpFieldError("logprob_start_len", f"logprob_start_len={req.logprob_start} is invalid: the "
                                     f"prompt has {len(processed.prompt_token_ids)} tokens.")
            stream = self.s.run(req.rid, processed, n=1)
            _, first = await anext(stream)  # a refusal (queue full, draining) raises here, before any answer
        except HttpFieldError as e:
            return e.status, _error(str(e), e.field, e.status)
        except Exception as e:  # the engine's or Serving's refusal, mapped as the gRPC services map it
            return _refusal(e)
        answers = self._answers(req, first, stream)
        if req.stream:
            return Streamed(_events(answers), stream.aclose)
        last = None
        try:
            async for last in answers:
                pass
        except Exception as e:  # the engine failed or stopped mid-request
            return _refusal(e)
        return 200, json.dumps(last).encode()

    async def _abort(self, body: bytes) -> tuple[int, bytes]:
        """End one request by its `rid` (any client with the key, as the Abort RPC), or every one (`abort_all`:
        only on a server that takes RL control calls, --enable-weight-updates, as the cache flush)."""
        try:
            data = json_object(body)
            for key in data:
                if key not in ("rid", "abort_all"):
                    raise HttpFieldError(key, f"{shown(key)} is refused: /abort_request takes rid or abort_all.")
            every, rid = json_flag(data, "abort_all"), data.get("rid")
            if every == (rid is not None) or (rid is not None and not isinstance(rid, str)):
                raise HttpFieldError("rid", "give `rid` (a request id, a string) or `abort_all`: true.")
        except HttpFieldError as e:
            return e.status, _error(str(e), e.field, e.status)
        if not every:
            return 200, json.dumps({"success": True, "num_aborted": await self.s.abort([rid])}).encode()
        if not self.s.engine.takes_control_calls:
            return 403, _error("abort_all is refused: this server ends every client's requests only when started "
                               "with --enable-weight-updates; end your own by `rid`.", "abort_all", 403)
        running = len(self.s.registry.active)
        await self.s.abort_all()
        return 200, json.dumps({"success": True, "num_aborted": running}).encode()

    def _read(self, body: bytes) -> _Request:
        data = json_object(body)
        for key in data:
            if key not in FIELDS:
                raise HttpFieldError(key, f"{shown(key)} is refused: it is not a field moelink's /generate takes "
                                          f"({', '.join(FIELDS)}).")
        if ("text" in data) == ("input_ids" in data):
            raise HttpFieldError("text", "give one prompt: `text` (a string) or `input_ids` (a list of token ids).")
        if "text" in data:
            prompt, field = data["text"], "text"
            if not isinstance(prompt, str):
                raise HttpFieldError("text", "text must be one string (a batch of prompts is not taken: send one "
                                             "request per prompt).")
        else:
            prompt, field = data["input_ids"], "input_ids"
            if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise HttpFieldError("input_ids", "input_ids must be one list of token ids (a batch of lists is not "
                                                  "taken: send one request per prompt).")
        model = data.get("model")
        if model is not None and (not isinstance(model, str) or model not in
                                  set(self.s.served_model_names) | set(self.s.model_aliases)):
            raise HttpFieldError("model", f"model={shown(repr(model))} is not served here "
                                          f"({', '.join(map(repr, self.s.served_model_names))}).")
        logprob = json_flag(data, "return_logprob")
        start = data.get("logprob_start_len", -1)
        if not _is_int(start) or start < -1:
            raise HttpFieldError("logprob_start_len", "logprob_start_len must be an integer >= -1 (-1: the output "
                                                      "tokens' logprobs only).")
        top = data.get("top_logprobs_num", 0)
        if not _is_int(top) or top < 0:
            raise HttpFieldError("top_logprobs_num", "top_logprobs_num must be an integer >= 0.")
        if (start != -1 or top) and not logprob:
            raise HttpFieldError("return_logprob", "logprob_start_len and top_logprobs_num need return_logprob: "
                                                   "true.")
        fields = _sampling(data.get("sampling_params"))
        self._within_limits(fields, top)
        extra = dict(return_routed_experts=json_flag(data, "return_routed_experts"))
        if logprob:
            extra["logprobs"] = top
            if start != -1:
                extra["prompt_logprobs"] = top
        try:
            params = SamplingParams(**{**fields, **extra})
        except ValueError as e:
            raise _renamed(str(e), data.get("sampling_params") or {}) from None
        if params.n != 1:
            raise HttpFieldError("sampling_params.n", "sampling_params.n must be 1 on /generate here: send one "
                                                      "request per sample (each with its own seed).")
        rid = data.get("rid")
        if rid is not None and not isinstance(rid, str):
            raise HttpFieldError("rid", "rid must be a string (a batch of ids is not taken).")
        lora = data.get("lora_path")
        if lora is not None and not isinstance(lora, str):
            raise HttpFieldError("lora_path", "lora_path must be the name of a served LoRA adapter (a string).")
        try:
            rid = self.s.request_id(rid or "")
        except ValueError as e:
            raise HttpFieldError("rid", shown(str(e), quote=False)) from None
        return _Request(prompt, field, params, rid, lora, json_flag(data, "stream"), None if start == -1 else start)

    def _within_limits(self, params: dict, top: int) -> None:
        """The server's request limits (limits.py: --max-logprobs, stop lists), as the gRPC services apply them."""
        lim = self.s.limits
        if top > lim.max_logprobs:
            raise HttpFieldError("top_logprobs_num", f"top_logprobs_num={top} is invalid: at most {lim.max_logprobs} "
                                                     "top logprobs per token (--max-logprobs).")
        stop = params.get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        try:
            lim.check("max_stop_strings", len(stop), "sampling_params.stop")
            for i, text in enumerate(stop):
                lim.check("max_stop_string_chars", len(text), f"sampling_params.stop[{i}]")
            lim.check("max_stop_token_ids", len(params.get("stop_token_ids", [])), "sampling_params.stop_token_ids")
        except ValueError as e:
            raise HttpFieldError(str(e).split(" has ", 1)[0], str(e)) from None

    async def _answers(self, req: _Request, first, stream) -> AsyncIterator[dict]:
        """SGLang's answer object after each of the engine's deltas, cumulative."""
        t0, text, ids, lps, tops, input_lps = time.monotonic(), [], [], [], [], None
        try:
            out = first
            while True:
                comp = out.outputs[0]
                text.append(comp.text)
                ids.extend(comp.token_ids)
                if req.params.logprobs is not None and comp.logprobs:
                    lps.extend(_triple(entry[t].logprob, t) for t, entry in zip(comp.token_ids, comp.logprobs))
                    if req.params.logprobs:
                        tops.extend(_tops(entry, req.params.logprobs) for entry in comp.logprobs)
                if input_lps is None and req.logprob_start is not None and out.prompt_logprobs is not None:
                    prompt = out.prompt_token_ids
                    input_lps = [[None if e is None else _wire(e[t].logprob), t, None]
                                 for t, e in zip(prompt[req.logprob_start:], out.prompt_logprobs[req.logprob_start:])]
                meta = {"id": req.rid, "finish_reason": _finish(comp, ids), "prompt_tokens": len(out.prompt_token_ids),
                        "completion_tokens": len(ids), "cached_tokens": out.num_cached_tokens,
                        "weight_version": out.weight_version, "e2e_latency": time.monotonic() - t0}
                if req.params.logprobs is not None:
                    meta["input_token_logprobs"] = input_lps or []
                    meta["output_token_logprobs"] = list(lps)
                    if req.params.logprobs:
                        meta["output_top_logprobs"] = list(tops)
                if comp.routed_experts is not None:
                    import numpy as np  # here: the serve CLI imports this module, and its parser imports no numpy

                    ids_LK = np.ascontiguousarray(comp.routed_experts, dtype=np.dtype("<i4"))
                    meta["routed_experts"] = base64.b64encode(ids_LK.tobytes()).decode("ascii")
                    meta["routed_experts_dtype"] = "int32"
                yield {"text": "".join(text), "output_ids": list(ids), "meta_info": meta}
                if out.finished:
                    return
                _, out = await anext(stream)
        finally:
            await stream.aclose()  # the engine's request ends with it (a client that left, an error)


def _sampling(sp: Any) -> dict:
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise HttpFieldError("sampling_params", "sampling_params must be a JSON object.")
    out: dict = {"max_tokens": SGLANG_MAX_NEW_TOKENS}
    for key, value in sp.items():
        if key not in SAMPLING:
            raise HttpFieldError(f"sampling_params.{key}", f"sampling_params.{shown(key)} is refused: moelink's "
                                                           f"/generate takes {', '.join(SAMPLING)}.")
        name, kind = SAMPLING[key]
        if value is None:
            continue
        ok = {"int": _is_int(value), "number": _is_int(value) or isinstance(value, float), "bool": isinstance(
            value, bool), "strs": isinstance(value, str) or (isinstance(value, list) and all(isinstance(
                v, str) for v in value)), "ints": isinstance(value, list) and all(_is_int(v) for v in value)}[kind]
        if not ok:
            raise HttpFieldError(f"sampling_params.{key}", f"sampling_params.{key} must be "
                                 + {"int": "an integer", "number": "a number", "bool": "true or false",
                                    "strs": "a string or a list of strings", "ints": "a list of token ids"}[kind] + ".")
        out[name] = value
    return out


def _renamed(message: str, given: dict) -> HttpFieldError:
    """SamplingParams' refusal (`SamplingParams.max_tokens=0 is invalid: ...`) under SGLang's name of the field."""
    name = message.split("=", 1)[0].removeprefix("SamplingParams.")
    key = next((k for k, (n, _) in SAMPLING.items() if n == name and k in given), None)
    if key is None:
        return HttpFieldError("sampling_params", f"sampling_params: {shown(message, quote=False)}")
    value = shown(json.dumps(given[key]), quote=False)
    return HttpFieldError(f"sampling_params.{key}", f"sampling_params.{key}={value} is invalid"
                          + shown(message.split(" is invalid", 1)[-1], quote=False))


def _finish(comp, ids: list[int]) -> Optional[dict]:
    """SGLang's finish_reason: {"type": "stop", "matched": the stop string or token id} or {"type": "length",
    "length": tokens generated}; None while generating."""
    reason = comp.finish_reason
    if reason is None:
        return None
    if reason == "stop":
        matched = comp.stop_reason if comp.stop_reason is not None else (ids[-1] if ids else None)
        return {"type": "stop", "matched": matched}
    if reason == "length":
        return {"type": "length", "length": len(ids)}
    return {"type": "abort", "message": f"the request ended: {reason}"}


async def _events(answers: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    try:
        async for answer in answers:
            yield b"data: " + json.dumps(answer).encode() + b"\n\n"
    except Exception as e:  # the engine failed or stopped mid-stream: said in the stream, as SGLang does
        yield b"data: " + _refusal(e)[1] + b"\n\n"
    finally:
        await answers.aclose()  # type: ignore[attr-defined]
    yield b"data: [DONE]\n\n"


def _wire(logprob: float) -> float:
    from ..serving import wire_logprob

    return wire_logprob(logprob)


def _tops(entry: dict, n: int) -> list:
    """SGLang's top_logprobs_num entries of one position: its n most likely tokens' triples, by rank."""
    from ..serving import top_logprobs

    return [_triple(lp.logprob, t) for t, lp in top_logprobs(entry, n)]


def _triple(logprob: float, token: int) -> list:
    """SGLang's logprob entry: [logprob, token id, token text (null: return_text_in_logprobs is not taken)]."""
    return [_wire(logprob), token, None]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _refusal(exc: BaseException) -> tuple[int, bytes]:
    from ..serving import status_for

    code, message = status_for(exc)
    status = _HTTP.get(code.name, 500)
    return status, _error(message, None, status)


def _error(message: str, param: Optional[str], code: int = 400) -> bytes:
    """The error body the front's other routes answer: {"error": {"message", "type", "param", "code"}}."""
    kind = {400: "BadRequestError", 403: "ForbiddenError", 404: "NotFoundError", 405: "MethodNotAllowed",
            429: "RateLimitError", 503: "ServiceUnavailableError"}.get(code, "InternalServerError")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


__all__ = ["ABORT_PATH", "GENERATE_PATH", "GenerateRoute", "PATHS", "Streamed"]
