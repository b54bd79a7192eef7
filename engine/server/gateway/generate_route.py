"""SGLang's native `POST /generate` on the HTTP port, answered from the engine beside the front (docs/rl.md#over-http).

slime, verl and AReaL drive an SGLang generator with it: token ids in (`input_ids`), and per generated token its id
and logprob (`meta_info.output_token_logprobs`) and, for rollout routing replay, the experts every forwarded
position was routed to (`meta_info.routed_experts`). smg (1.13) has a /generate of its own, but it reaches the
worker by the VllmEngine protocol, which has no routed-experts field (nor prompt logprobs), and the front never
relayed it; so the front answers it itself, in SGLang's request and response shapes, through the same Serving the
gRPC services use (admission limits, request registry, aborts). Beside it SGLang's `POST /abort_request`, which
slime sends each worker to end a rollout: `{"rid"}` ends that request of the caller's; `{"abort_all": true}` ends
every client's, and is taken only from a server started with --enable-weight-updates (403 naming it), as the cache
flush.

Who sent a request (client_identity.http_client: its host, then the user an `x-client-id` names under --api-key or
else its connection) is its share of the scheduler, as for a gRPC call, and the scope of its `rid`s (the user, or
the host): two clients may run the same rid at once, and neither learns of the other's (registry.RequestKey). A
request is at most --max-batch-sequences sequences (prompts x n) and its body at most --max-http-body-bytes (the
front answers 413 from its Content-Length); a large body is parsed off the event loop (json_body.off_loop).

Request (generate_request.py reads it): `text` or `input_ids`, one prompt or a batch (a list of them),
`sampling_params` (SGLang's names, one object or one per prompt; `n` samples of each prompt), `return_logprob`,
`logprob_start_len` (-1: output tokens only), `top_logprobs_num`, `return_routed_experts`, `stream`, `rid`, `lora_path`
(a served adapter's name), `model`. Any other field, or a sampling key not listed, is refused (400 naming it), never
ignored. Answer: `{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens", "completion_tokens",
"cached_tokens", "weight_version", "e2e_latency", ...}}` for one prompt with n = 1; a list of such objects for a batch
or n > 1, prompt by prompt with each prompt's n samples together (SGLang's order). Streamed, the same object so far
(text, ids and logprobs cumulative: SGLang's default) per `data:` event, then `data: [DONE]`; a batch's events come as
its results move, each with `"index"`, its place in that order (as SGLang streams a batch). Each prompt is one request
of n samples in the engine (`meta_info.id` its rid for every sample: what `/abort_request` ends); a refusal of any
prompt (the queue full) ends the others and answers the refusal alone.

`meta_info.routed_experts`: SGLang's encoding, base64 of the flat little-endian int32 array [prompt + generated - 1,
MoE layers, top_k], with `routed_experts_dtype` "int32" (SGLang's key). Not the gRPC path's int16: slime and the
RL drivers built on SGLang decode the string as int32 without reading a dtype, and would misread narrower ids.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from ...contract.safe_text import shown
from ..client_identity import client_scope
from .generate_request import GenerateRequest, check_answer, read_request, routed_bytes_per_token
from .http_wire import error_body
from .json_body import json_flag, json_object, off_loop
from .openai_fields import HttpFieldError

GENERATE_PATH = "/generate"
# SGLang's `POST /abort_request` {"rid"} or {"abort_all": true}: what slime sends every worker to end a rollout.
ABORT_PATH = "/abort_request"
PATHS = (GENERATE_PATH, ABORT_PATH)
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


class GenerateRoute:
    """Answers `POST /generate` from a Serving (serving.py) on the server's loop."""

    def __init__(self, serving):
        self.s = serving

    def body_limit(self, path: str) -> Optional[int]:
        """The largest body the front reads for `path` (413 beyond it), or None for another path."""
        return self.s.limits.max_http_body_bytes if path in PATHS else None

    async def answer(self, method: bytes, path: str, body: bytes, query: str = "", client: tuple[str, ...] = ()):
        """(HTTP status, JSON body), a Streamed answer, or None for another path. `client`: who sent it
        (client_identity.http_client): its requests' share of the scheduler, and the scope of its `rid`s (the
        user, or the host: client_identity.client_scope, registry.RequestKey)."""
        if path not in PATHS:
            return None
        if method != b"POST":
            return 405, _error(f"{path} takes POST (a JSON body), not {method.decode('latin-1')}.", None, 405)
        scope = client_scope(client)
        if path == ABORT_PATH:
            return await self._abort(body, scope)
        try:
            # Parsed and checked off the event loop when large (json_body.off_loop).
            req = await off_loop(body, read_request, body, self.s)
            runs = await self._start(req, client, scope)
        except HttpFieldError as e:
            return e.status, _error(str(e), e.field, e.status)
        except Exception as e:  # the engine's or Serving's refusal, mapped as the gRPC services map it
            return _refusal(e)
        results = _Results(req)
        if req.stream:
            return Streamed(_events(req, results, runs), runs.aclose)
        try:
            async with runs:
                async for prompt, sample, out in runs:
                    results.update(prompt, sample, out)
        except Exception as e:  # the engine failed or stopped mid-request
            return _refusal(e)
        answers = results.answers()
        return 200, json.dumps(answers[0] if req.single else answers).encode()

    async def _start(self, req: GenerateRequest, client: tuple[str, ...], scope: str) -> "_Runs":
        """Every prompt prepared, then admitted (n samples each) with its first output in hand; a refusal of any
        (a prompt too long, the queue full) raises after the ones admitted are ended."""
        processed = []
        for p in req.prompts:
            one = await self.s.prepare(p.rid, p.prompt, p.params, p.field,
                                       lora=self.s.adapter(p.lora, "lora_path") if p.lora else None, scope=scope)
            if req.logprob_start is not None and req.logprob_start >= len(one.prompt_token_ids):
                raise HttpFieldError("logprob_start_len", f"logprob_start_len={req.logprob_start} is invalid: "
                                     f"{p.field} has {len(one.prompt_token_ids)} tokens.")
            processed.append(one)
            await asyncio.sleep(0)  # a short prompt is checked on the loop: other streams move between prompts
        if not req.stream:  # the answer's size with the prompts' token counts, before anything runs
            check_answer(self.s.limits, req, [len(one.prompt_token_ids) for one in processed],
                         routed_bytes_per_token(self.s, req))
        return await admit_runs(self.s, [p.rid for p in req.prompts], processed, req.n, client, scope)

    async def _abort(self, body: bytes, scope: str) -> tuple[int, bytes]:
        """End one request by its `rid`, among the caller's own (`scope`: the ids of other clients are not theirs to
        end, nor to learn of), or every one (`abort_all`: only on a server that takes RL control calls,
        --enable-weight-updates, as the cache flush)."""
        try:
            data = await off_loop(body, json_object, body)
            for key in data:
                if key not in ("rid", "abort_all"):
                    raise HttpFieldError(key, f"{shown(key)} is refused: /abort_request takes rid or abort_all.")
            every, rid = json_flag(data, "abort_all"), data.get("rid")
            if rid == "":  # SGLang's default rid (verl and slime send it beside abort_all): no request named
                rid = None
            if every == (rid is not None) or (rid is not None and not isinstance(rid, str)):
                raise HttpFieldError("rid", "give `rid` (a request id, a string) or `abort_all`: true.")
        except HttpFieldError as e:
            return e.status, _error(str(e), e.field, e.status)
        if not every:
            return 200, json.dumps({"success": True, "num_aborted": await self.s.abort([rid], scope)}).encode()
        if not self.s.engine.takes_control_calls:
            return 403, _error("abort_all is refused: this server ends every client's requests only when started "
                               "with --enable-weight-updates; end your own by `rid`.", "abort_all", 403)
        running = len(self.s.registry.active)
        await self.s.abort_all()
        return 200, json.dumps({"success": True, "num_aborted": running}).encode()

async def admit_runs(serving, rids: list[str], processed: list, n: int, client: tuple[str, ...], scope: str
                     ) -> "_Runs":
    """Prepared prompts admitted (n samples each), each with its first output in hand: a refusal of any (the queue
    full) ends the ones admitted and raises (the /generate and /v1/completions routes)."""
    streams = [serving.run(rid, one, n=n, client=client, scope=scope) for rid, one in zip(rids, processed)]
    firsts = await asyncio.gather(*(_first(s) for s in streams), return_exceptions=True)
    runs = _Runs(streams, firsts)
    refused = next((f for f in firsts if isinstance(f, BaseException)), None)
    if refused is not None:
        await runs.aclose()
        raise refused
    return runs


async def _first(stream):
    return await anext(stream)  # a refusal (the queue full, draining) raises here, before any answer


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


class _Runs:
    """The prompts' sample streams (Serving.run, first outputs in hand) merged: (prompt, sample, output) as they
    come. Closing it ends every request, whether or not it was ever iterated (the front's `stop`)."""

    def __init__(self, streams: list, firsts: list):
        self.streams, self.firsts = streams, firsts
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "_Runs":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def __aiter__(self) -> AsyncIterator[tuple[int, int, Any]]:
        for i, (sample, out) in enumerate(self.firsts):
            yield i, sample, out
        if len(self.streams) == 1:  # one prompt: no merging task
            async for sample, out in self.streams[0]:
                yield 0, sample, out
            return
        # Bounded (issue 95 item 3): a pump waits while what it put is not taken, so a client that reads nothing
        # (the front's write blocked) leaves each prompt's outputs in its own stream, under the engine's bound,
        # rather than in a queue here that grew for as long as the engine generated.
        queue: asyncio.Queue = asyncio.Queue(maxsize=len(self.streams))
        done = object()

        async def pump(i: int, stream) -> None:
            try:
                async for item in stream:
                    await queue.put((i, item))
            except Exception as exc:  # handed to the consumer, which raises it
                await queue.put((i, exc))
                return
            await queue.put((i, done))

        self.tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        left = len(self.tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item[0], item[1]

    async def aclose(self) -> None:
        """End every prompt's request (their engine requests are aborted as their streams close)."""
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for s in self.streams:
            await s.aclose()


@dataclass
class _Sample:
    """One result's answer so far (SGLang's object, cumulative)."""

    text: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    lps: list = field(default_factory=list)
    tops: list = field(default_factory=list)
    answer: Optional[dict] = None


class _Results:
    """Every result of a request, by its place in the answer (GenerateRequest.index).

    A prompt's logprobs (logprob_start_len) are the same for its n samples, and are computed once, by its sample 0
    (SamplingParams.sample): they are sent once too, in sample 0's `meta_info.input_token_logprobs` (streamed: in
    the first event that has them), and the prompt's other samples (and sample 0's later events) carry null there.
    Repeated with each sample and each streamed event, a 0.09 MB request was answered with 85.5 MB (issue 76 item
    10). Without logprob_start_len the field is [] for every result, as before."""

    def __init__(self, req: GenerateRequest):
        self.req, self.t0 = req, time.monotonic()
        self.samples = [_Sample() for _ in range(len(req.prompts) * req.n)]
        self.input_lps: dict[int, list] = {}  # per prompt, from the sample that scored it (sample 0)
        self.streamed_input: set[int] = set()  # prompts whose logprobs a streamed event already carried

    def update(self, prompt: int, sample: int, out) -> dict:
        """Result (prompt, sample) after the engine's delta `out`: SGLang's answer object so far."""
        req, p = self.req, self.req.prompts[prompt]
        one = self.samples[req.index(prompt, sample)]
        comp = out.outputs[0]
        one.text.append(comp.text)
        one.ids.extend(comp.token_ids)
        params = p.params
        if params.logprobs is not None and comp.logprobs:
            one.lps.extend(_triple(entry[t].logprob, t) for t, entry in zip(comp.token_ids, comp.logprobs))
            if params.logprobs:
                one.tops.extend(_tops(entry, params.logprobs) for entry in comp.logprobs)
        start = req.logprob_start
        if start is not None and prompt not in self.input_lps and out.prompt_logprobs is not None:
            self.input_lps[prompt] = [[None if e is None else _wire(e[t].logprob), t, None] for t, e in
                                      zip(out.prompt_token_ids[start:], out.prompt_logprobs[start:])]
        meta = {"id": p.rid, "finish_reason": _finish(comp, one.ids), "prompt_tokens": len(out.prompt_token_ids),
                "completion_tokens": len(one.ids), "cached_tokens": out.num_cached_tokens,
                "weight_version": out.weight_version, "e2e_latency": time.monotonic() - self.t0}
        if params.logprobs is not None:
            meta["input_token_logprobs"] = self._input_logprobs(prompt, sample)
            meta["output_token_logprobs"] = list(one.lps)
            if params.logprobs:
                meta["output_top_logprobs"] = list(one.tops)
        if comp.routed_experts is not None:
            import numpy as np  # here: the serve CLI imports this module, and its parser imports no numpy

            ids_LK = np.ascontiguousarray(comp.routed_experts, dtype=np.dtype("<i4"))
            meta["routed_experts"] = base64.b64encode(ids_LK.tobytes()).decode("ascii")
            meta["routed_experts_dtype"] = "int32"
        one.answer = {"text": "".join(one.text), "output_ids": list(one.ids), "meta_info": meta}
        return one.answer

    def _input_logprobs(self, prompt: int, sample: int) -> Optional[list]:
        """What `meta_info.input_token_logprobs` of result (prompt, sample) carries now (the class docstring)."""
        if self.req.logprob_start is None:
            return []
        lps = self.input_lps.get(prompt)
        if sample or lps is None:
            return None
        if self.req.stream:
            if prompt in self.streamed_input:
                return None
            self.streamed_input.add(prompt)
        return lps

    def answers(self) -> list[dict]:
        """The finished answers, in SGLang's order (a prompt's logprobs with its sample 0 alone: the class
        docstring)."""
        out = []
        for i, one in enumerate(self.samples):
            answer = dict(one.answer or {})
            meta = answer.get("meta_info")
            if meta is not None and "input_token_logprobs" in meta:
                meta["input_token_logprobs"] = self._input_logprobs(i // self.req.n, i % self.req.n)
            out.append(answer)
        return out


async def _events(req: GenerateRequest, results: _Results, runs: _Runs) -> AsyncIterator[bytes]:
    """SGLang's server-sent events: each result's answer so far as it moves (a batch's with its `index`)."""
    try:
        async for prompt, sample, out in runs:
            answer = results.update(prompt, sample, out)
            if not req.single:
                answer = {**answer, "index": req.index(prompt, sample)}
            yield b"data: " + json.dumps(answer).encode() + b"\n\n"
    except Exception as e:  # the engine failed or stopped mid-stream: said in the stream, as SGLang does
        yield b"data: " + _refusal(e)[1] + b"\n\n"
    finally:
        await runs.aclose()
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


def _refusal(exc: BaseException) -> tuple[int, bytes]:
    from ..serving import status_for

    code, message = status_for(exc)
    status = _HTTP.get(code.name, 500)
    return status, _error(message, None, status)


def _error(message: str, param: Optional[str], code: int = 400) -> bytes:
    """vLLM's error body (http_wire.error_body): {"error": {"message", "type", "param", "code"}}."""
    return error_body(message, param, code)


__all__ = ["ABORT_PATH", "GENERATE_PATH", "GenerateRoute", "PATHS", "Streamed"]
