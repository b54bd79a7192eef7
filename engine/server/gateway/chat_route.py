"""vLLM's `POST /v1/chat/completions` answered by the HTTP front from the engine beside it
(docs/vllm-compat.md#v1chatcompletions), as `/v1/completions` is (completions_route.py).

Why: smg (1.13), which answered every chat, drops or mangles what vLLM answers: `min_tokens`,
`include_stop_str_in_output`, `truncate_prompt_tokens`, `add_generation_prompt: false` and `return_token_ids` were
ignored, a role a template takes (`"wizard"`) refused, the last logprobs entry (a stop token, `<|endoftext|>`)
lost, `finish_reason` streamed in an extra empty chunk, and smg sampled with its own defaults, not the checkpoint's
generation_config (issue 79 items 3 to 7). So the front renders the chat itself (chat_render.py, the server's chat
template) and answers it in vLLM 0.32's shapes (chat_request.py reads the request, chat_answer.py builds the
answer), through the same Serving, admission, registry, client share and abort-on-hang-up as completions.

What smg alone carries is relayed to it as before (chat_request.claims): tool calls, a server's reasoning parser,
structured outputs and response_format, image/video/audio parts; and every body on a server without a vocabulary.
"""
from __future__ import annotations

import time
from typing import AsyncIterator, Awaitable, Optional

from ...contract.safe_text import shown
from ..client_identity import client_scope
from .chat_answer import ChatAnswer
from .chat_request import ChatRequest, claims, read_request, refused_field, unknown_field
from .completions_route import CompletionsRoute, _answered, base_request_id, sse_events, whole_answer
from .generate_route import Streamed, _Runs, _error, _refusal
from .json_body import json_text_object, off_loop
from .openai_fields import CHAT_PATH, HttpFieldError

PATH = CHAT_PATH


class ChatRoute(CompletionsRoute):
    """Answers `POST /v1/chat/completions` from a Serving (serving.py) on the server's loop; the admission, the
    adapter lookup and the token texts are the completions route's."""

    def __init__(self, serving, chat_template: Optional[str] = None, relay_all: bool = False,
                 tokens_as_ids: bool = False):
        """`chat_template`: the server's --chat-template text (else the checkpoint's); `relay_all`: every chat goes
        to smg (the server has a --reasoning-parser, which smg applies); `tokens_as_ids`:
        --return-tokens-as-token-ids (a request's return_tokens_as_token_ids wins)."""
        super().__init__(serving, tokens_as_ids)
        tok = self.tokenizer
        self.renderer = tok.with_chat_template(chat_template) if tok is not None and chat_template else tok
        self.relay_all = relay_all

    async def claim(self, body: bytes, client: tuple[str, ...] = (), header_id: Optional[str] = None
                    ) -> Optional[Awaitable]:
        """The coroutine answering this chat body here ((status, body) or a Streamed), or None: relayed to smg.
        A field the engine cannot honour is 400 either way; one nobody reads is 400 naming it. `header_id`: the
        X-Request-Id header (the answer's id, as vLLM's)."""
        if self.tokenizer is None:
            return None
        try:
            # Every string valid Unicode (json_body.refuse_lone_surrogates): messages' roles and contents, tools, stop.
            data = await off_loop(body, json_text_object, body)
            refused_field(data)
        except HttpFieldError as e:
            return _answered(e.status, _error(str(e), e.field, e.status))
        if not claims(data, self.relay_all):
            unknown = unknown_field(data)
            if unknown is not None:  # read by nobody: refused by name, not relayed to be dropped by the gateway
                return _answered(400, _error(f"{shown(unknown)} is not a field of /v1/chat/completions (vLLM's "
                                             "fields: docs/vllm-compat.md#v1chatcompletions).", unknown, 400))
            return None
        return self._answer_chat(body, data, client, base_request_id(data, header_id))

    async def _answer_chat(self, body: bytes, data: dict, client: tuple[str, ...], base: str):
        scope = client_scope(client)
        try:
            lora = self._adapter(data.get("model"))
            # The template renders on a worker thread for a large body (json_body.off_loop).
            req = await off_loop(body, read_request, data, self.s, self.renderer, lora, base)
            runs = await self._start(req, client, scope)
        except HttpFieldError as e:
            return e.status, _error(str(e), e.field, e.status)
        except Exception as e:  # the engine's or Serving's refusal, mapped as the gRPC services map it
            return _refusal(e)
        as_ids = self.tokens_as_ids if req.tokens_as_ids is None else req.tokens_as_ids
        answer = ChatAnswer(req, lora or self.s.served_model_name, int(time.time()), self._decode_one, as_ids)
        if req.stream:
            return Streamed(sse_events(_events(req, answer, runs), runs, one_choice=req.n == 1), runs.aclose)
        return await whole_answer(runs, lambda _, sample, out: answer.add(sample, out), answer.body)

    def _check_answer(self, req, processed: list) -> None:
        """Checked already, when the chat was rendered (chat_request.read_request)."""


async def _events(req: ChatRequest, answer: ChatAnswer, runs: _Runs) -> AsyncIterator[dict]:
    """Each choice's chunks, then the usage when asked (completions_route.sse_events frames them)."""
    async for _, sample, out in runs:
        if out.outputs[0].finish_reason == "error":
            raise RuntimeError("the engine failed the request")
        for event in answer.chunks(sample, out):
            yield event
    if req.include_usage:
        yield answer.usage_event()


__all__ = ["ChatRoute", "PATH"]
