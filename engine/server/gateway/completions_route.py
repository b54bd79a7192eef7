"""vLLM's `POST /v1/completions` answered by the HTTP front from the engine beside it (docs/vllm-compat.md#v1completions).

Why: smg (1.13) answers completions without `logprobs` (its legacy logprobs object is a TODO), without `echo` and
`prompt_logprobs`, and refuses token-id prompts (`"prompt": [1817, 366]`: "did not match any variant of untagged
enum"), while vLLM answers all of them; lm-eval's `local-completions` scores a model with exactly those
(`echo`, `logprobs`, `max_tokens` 0 or 1, token-id prompts). So `moelink serve`'s front answers the route itself, in
vLLM 0.32's request and response shapes (completions_request.py reads the request, completions_answer.py builds the
answer), through the same Serving the gRPC services and `/generate` use: admission limits, the request registry, the
client's fair share, and an abort in the engine when the client hangs up (http_wire.answer_watched).

A body with a field only smg carries (vLLM's structured-output fields, `response_format`, SGLang's `regex` / `ebnf`)
or one neither knows is relayed to smg as before (`claim` answers None), and so is every body on a server without a
vocabulary; a front before a gateway started by hand (`moelink http-front`) relays every one.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from ...contract.safe_text import shown
from ..client_identity import client_scope
from ...core.no_tokenizer import NoTokenizer
from .completions_answer import CompletionAnswer
from .completions_request import CompletionRequest, check_answer, claims, read_request, unknown_field
from .generate_route import Streamed, _Runs, _error, _refusal, admit_runs
from .smg_errors import http_message, http_param
from .hangups import MAX_CLIENT_ID_CHARS
from .json_body import json_text_object, off_loop
from .openai_fields import COMPLETIONS_PATH, HttpFieldError

PATH = COMPLETIONS_PATH


class CompletionsRoute:
    """Answers `POST /v1/completions` from a Serving (serving.py) on the server's loop."""

    def __init__(self, serving, tokens_as_ids: bool = False):
        """`tokens_as_ids`: --return-tokens-as-token-ids (a request's return_tokens_as_token_ids wins)."""
        self.s = serving
        self.tokens_as_ids = tokens_as_ids

    @property
    def tokenizer(self):
        """The engine's tokenizer, None on a server without a vocabulary."""
        tok = self.s.tokenizer
        return None if isinstance(tok, NoTokenizer) else tok

    async def claim(self, body: bytes, client: tuple[str, ...] = (), header_id: Optional[str] = None
                    ) -> Optional[Awaitable]:
        """The coroutine answering this completions body here ((status, body) or a Streamed), or None: relayed to
        smg (a field only smg carries, or no vocabulary here). `client`: who sent it (client_identity.http_client);
        `header_id`: the request's X-Request-Id header, the answer's id when given (vLLM's _base_request_id)."""
        if self.tokenizer is None:
            return None
        try:
            data = await off_loop(body, json_text_object, body)
        except HttpFieldError as e:
            return _answered(e.status, _error(str(e), e.field, e.status))
        if not claims(data):
            unknown = unknown_field(data)
            if unknown is not None:  # read by nobody: refused by name, not relayed to be dropped by the gateway
                return _answered(400, _error(f"{shown(unknown)} is not a field of /v1/completions (vLLM's fields: "
                                             "docs/vllm-compat.md#v1completions).", unknown, 400))
            return None
        return self._answer(data, client, header_id, body)

    async def _answer(self, data: dict, client: tuple[str, ...], header_id: Optional[str] = None, body: bytes = b""):
        scope = client_scope(client)
        base = base_request_id(data, header_id)
        try:
            lora = self._adapter(data.get("model"))
            # Read and checked on a worker thread for a large body (json_body.off_loop): its lists' checks are
            # bounded by their lengths, but each entry of a long one is still looked at once.
            req = await off_loop(body, read_request, data, self.s, lora, base)
            runs = await self._start(req, client, scope)
        except HttpFieldError as e:
            return e.status, _error(str(e), e.field, e.status)
        except Exception as e:  # the engine's or Serving's refusal, mapped as the gRPC services map it
            return _refusal(e)
        as_ids = self.tokens_as_ids if req.tokens_as_ids is None else req.tokens_as_ids
        answer = CompletionAnswer(req, lora or self.s.served_model_name, int(time.time()), self._decode_one,
                                  self._decode_prompt, as_ids)
        if req.stream:
            one = req.n == 1 and len(req.prompts) == 1
            return Streamed(sse_events(_events(req, answer, runs), runs, one_choice=one), runs.aclose)
        return await whole_answer(runs, answer.add, answer.body)

    def _adapter(self, model: Any) -> Optional[str]:
        """The LoRA adapter `model` names, None for the base model (a served name, an alias, or none given, as vLLM
        takes it); 404 for another name, as vLLM answers."""
        if model is None:
            return None
        if not isinstance(model, str):
            raise HttpFieldError("model", "model must be a string (a served model's name).")
        if model in self.s.served_model_names or model in self.s.model_aliases:
            return None
        if self.s.adapters.get(model) is not None:
            return model
        from .vllm_routes import NotFound

        raise NotFound("model", f"The model `{shown(model, quote=False)}` does not exist.")

    async def _start(self, req: CompletionRequest, client: tuple[str, ...], scope: str) -> _Runs:
        """Every prompt prepared, then admitted (n samples each) with its first output in hand; a refusal of any (a
        prompt too long, the queue full) raises after the ones admitted are ended."""
        lora = self.s.adapter(req.lora, "model") if req.lora else None
        processed = []
        for p in req.prompts:
            try:
                one = await self.s.prepare(p.rid, p.prompt, req.params, p.field, keep=req.keep, lora=lora,
                                           scope=scope)
            except ValueError as e:  # the prompt's own fault (too long, a token outside the vocabulary), or max_tokens'
                named = http_param(str(e), None)  # `SamplingParams.max_tokens=... is too large`: vLLM's param max_tokens
                field = named if named is not None and named != "prompt" else p.field
                raise HttpFieldError(field, shown(http_message(str(e)), quote=False)) from None
            processed.append(one)
            await asyncio.sleep(0)  # a short prompt is checked on the loop: other streams move between prompts
        if not req.stream:  # the answer's size with the prompts' token counts, before anything runs
            self._check_answer(req, processed)
        return await admit_runs(self.s, [p.rid for p in req.prompts], processed, req.n, client, scope)

    def _check_answer(self, req: CompletionRequest, processed: list) -> None:
        """A non-streamed answer's estimated size against --max-answer-bytes (answer_budget.py)."""
        check_answer(self.s.limits, [len(p.prompt_token_ids) for p in processed], req.n, req.params.max_tokens or 1,
                     req.logprobs, req.params.prompt_logprobs, req.echo)

    def _decode_one(self, token: int) -> str:
        """One token's own text (vLLM's decoded token: special tokens kept)."""
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _decode_prompt(self, ids: list) -> str:
        """A token-id prompt's text, for `echo` (special tokens kept, as vLLM decodes it)."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def base_request_id(data: dict, header_id: Optional[str]) -> str:
    """The id an answer is named by (`cmpl-<id>`, `chatcmpl-<id>`): the X-Request-Id header, else the body's
    `request_id`, else a fresh one (vLLM's order). A header of other than 1 to MAX_CLIENT_ID_CHARS visible ASCII
    characters is not taken (it would reach the server's logs)."""
    if header_id and len(header_id) <= MAX_CLIENT_ID_CHARS and all("!" <= c <= "~" for c in header_id):
        return header_id
    given = data.get("request_id")
    return given if isinstance(given, str) and given else uuid.uuid4().hex


async def _answered(status: int, body: bytes) -> tuple[int, bytes]:
    return status, body


def _dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as vLLM's server writes it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


async def whole_answer(runs: _Runs, take: Callable[[int, int, Any], None], body: Callable[[], dict]
                       ) -> tuple[int, bytes]:
    """A non-streamed answer (completions' and chat's): every output of the request's runs taken
    (`take(prompt, sample, out)`), then `body()`; the engine's failure as the gRPC services map it, 500 when it
    failed a choice."""
    try:
        async with runs:
            async for prompt, sample, out in runs:
                take(prompt, sample, out)
    except Exception as e:  # the engine failed or stopped mid-request
        return _refusal(e)
    answer = body()
    if any(c["finish_reason"] == "error" for c in answer["choices"]):
        return 500, _error("the engine failed the request.", None, 500)
    return 200, _dumps(answer)


async def sse_events(events: AsyncIterator[dict], runs: _Runs, one_choice: bool = False) -> AsyncIterator[bytes]:
    """vLLM's server-sent events of a streamed answer (completions' and chat's): each event as `data: JSON`, an
    error raised meanwhile (the engine failed or stopped mid-stream) as vLLM's error event, then [DONE]; the
    request's runs closed either way.

    `one_choice` (one prompt, n 1): the event that finishes the choice is held, and leaves with the events after it
    (the usage) and [DONE] as one chunk: one write at the stream's end where there were three, each a loopback send
    and a wake-up of the client (the sends are most of the front's time at 64 streams). Nothing waits on the hold:
    the stream's end follows its last output at once."""
    held = b""
    try:
        async for event in events:
            data = b"data: " + _dumps(event) + b"\n\n"
            if held or (one_choice and _finishes(event)):
                held += data
            else:
                yield data
    except Exception as e:
        held += b"data: " + _refusal(e)[1] + b"\n\n"
    finally:
        await runs.aclose()
    yield held + b"data: [DONE]\n\n"


def _finishes(event: dict) -> bool:
    """Whether a stream event ends a choice (its finish_reason is set)."""
    return any(c.get("finish_reason") is not None for c in event.get("choices", ()))


async def _events(req: CompletionRequest, answer: CompletionAnswer, runs: _Runs) -> AsyncIterator[dict]:
    """Each choice's deltas, then the usage when asked (sse_events frames them)."""
    async for prompt, sample, out in runs:
        for event in answer.chunks(prompt, sample, out):
            if event["choices"][0]["finish_reason"] == "error":
                raise RuntimeError("the engine failed the request")
            yield event
    for event in answer.flush():
        yield event
    if req.include_usage:
        yield answer.usage_event()


__all__ = ["CompletionsRoute", "PATH", "base_request_id", "sse_events", "whole_answer"]
