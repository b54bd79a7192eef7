"""vLLM's `/v1/chat/completions` answer built from the engine's outputs (chat_route.py runs the request).

The shapes are vLLM 0.32's (`vllm/entrypoints/openai/chat_completion/serving.py` and `protocol.py`), as its server
writes them:

- answered whole: `{"id": "chatcmpl-...", "object": "chat.completion", "created", "model", "choices": [{"index",
  "message": {"role", "content", "refusal", "annotations", "audio", "function_call", "reasoning"}, "logprobs",
  "finish_reason", "stop_reason", "token_ids", "routed_experts"}], "service_tier", "system_fingerprint", "usage":
  {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"},
  "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params", "ec_transfer_params", "metrics"}`;
- `logprobs`: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`, one
  entry for EVERY generated token, the stop token or `<|endoftext|>` included (smg 1.13 lost the last one: issue 79
  item 5); `top_logprobs` the first `top_logprobs` of the position's entry in vLLM's order (the sampled token first,
  then the rest by rank), logprobs clamped at -9999.0;
- `echo`: the last message's content before each choice's, when that message has the answer's role;
- streamed: per choice a first chunk `{"delta": {"role", "content": ""}}` (with `prompt_token_ids` and `prompt_text`
  at the top), the echo's chunk, then one chunk per engine delta, the choice's last carrying its `finish_reason`
  and `stop_reason` (no extra empty chunk); `stream_options.include_usage` adds a last chunk of no choices with the
  usage, `continuous_usage_stats` a usage in every chunk; `data: [DONE]` ends it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .chat_request import ChatRequest
from .completions_answer import MIN_WIRE_LOGPROB, ChoiceSoFar, prompt_logprobs_json, token_text, vllm_order, wire

CHUNK = "chat.completion.chunk"


def _entry(token: str, logprob: float, decoded: Optional[str]) -> dict:
    return {"token": token, "logprob": logprob,
            "bytes": None if decoded is None else list(decoded.encode("utf-8", errors="replace"))}


def chat_logprobs(token_ids, entries, top: int, decode: Callable[[int], str], as_ids: bool = False) -> dict:
    """vLLM's ChatCompletionLogProbs of `token_ids` (`entries[i]`: position i's {token id: Logprob}, or None).
    `as_ids`: each `token` named `token_id:N` (completions_answer.token_text); `bytes` are its text's either way."""
    content = []
    for i, tid in enumerate(token_ids):
        entry = entries[i] if i < len(entries) else None
        if entry is None or entry.get(tid) is None:
            text = decode(tid)
            content.append({**_entry(token_text(tid, None, decode, as_ids), MIN_WIRE_LOGPROB, text),
                            "top_logprobs": []})
            continue
        lp = entry[tid]
        tops = [_entry(token_text(t, o, decode, as_ids), wire(o.logprob), token_text(t, o, decode))
                for t, o in vllm_order(entry, tid)[:top]]
        content.append({**_entry(token_text(tid, lp, decode, as_ids), wire(lp.logprob), lp.decoded_token),
                        "top_logprobs": tops})
    return {"content": content}


@dataclass
class _Choice(ChoiceSoFar):
    started: bool = False  # streamed: its role chunk sent
    done: bool = False  # streamed: its finish sent


class ChatAnswer:
    """Every choice of one chat request, fed the engine's delta outputs as they come (`add` for an answer sent
    whole, `chunks` for a stream)."""

    def __init__(self, req: ChatRequest, model: str, created: int, decode_one: Callable[[int], str],
                 as_ids: bool = False):
        """`as_ids`: the logprobs' tokens as `token_id:N` (chat_logprobs)."""
        self.req, self.model, self.created, self.decode_one, self.as_ids = req, model, created, decode_one, as_ids
        self.id = f"chatcmpl-{req.base_id}"
        self.choices = [_Choice() for _ in range(req.n)]
        self.prompt_ids: list = []
        self.prompt_lps: Optional[list] = None

    def _seen(self, out) -> None:
        if not self.prompt_ids:
            self.prompt_ids = list(out.prompt_token_ids)
        if self.prompt_lps is None and out.prompt_logprobs is not None:
            self.prompt_lps = out.prompt_logprobs

    def _logprobs(self, ids, entries) -> Optional[dict]:
        if not self.req.logprobs:
            return None
        return chat_logprobs(ids, entries or [], self.req.top_logprobs, self.decode_one, self.as_ids)

    def add(self, sample: int, out) -> None:
        """One delta output of choice `sample`, kept for the whole answer."""
        self._seen(out)
        self.choices[sample].take(out.outputs[0])

    def body(self) -> dict:
        """The whole answer (vLLM's ChatCompletionResponse)."""
        req, choices = self.req, []
        for i, ch in enumerate(self.choices):
            message = {"role": req.role, "content": req.echoed + "".join(ch.text), "refusal": None,
                       "annotations": None, "audio": None, "function_call": None, "reasoning": None}
            choices.append({"index": i, "message": message, "logprobs": self._logprobs(ch.ids, ch.logprobs),
                            "finish_reason": ch.finish_reason or "stop", "stop_reason": ch.stop_reason,
                            "token_ids": list(ch.ids) if req.return_token_ids else None, "routed_experts": None})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "service_tier": None, "system_fingerprint": None,
                "usage": {**self.usage(), "prompt_tokens_details": None, "completion_tokens_details": None},
                "prompt_logprobs": prompt_logprobs_json(self.prompt_lps, self.prompt_ids),
                "prompt_token_ids": list(self.prompt_ids) if req.return_token_ids else None,
                "prompt_text": req.rendered.text if req.return_prompt_text else None, "kv_transfer_params": None,
                "ec_transfer_params": None, "metrics": None}

    def usage(self, done: Optional[int] = None) -> dict:
        """{"prompt_tokens", "total_tokens", "completion_tokens"}: every choice's tokens, or `done` of them."""
        prompt = len(self.prompt_ids)
        done = sum(len(ch.ids) for ch in self.choices) if done is None else done
        return {"prompt_tokens": prompt, "total_tokens": prompt + done, "completion_tokens": done}

    def chunks(self, sample: int, out) -> list[dict]:
        """The stream chunks (as dicts) this delta output of choice `sample` makes: the first output of the request
        also opens every choice (its role chunk and the echo), as vLLM opens them at its first output."""
        self._seen(out)
        events = self._open() if not self.choices[0].started else []
        ch, comp = self.choices[sample], out.outputs[0]
        if ch.done or (not comp.text and not comp.token_ids and not ch.ids):
            return events  # nothing generated yet (vLLM sends no empty chunk before the first token)
        ch.ids.extend(comp.token_ids)
        choice: dict = {"index": sample, "delta": {"content": comp.text},
                        "logprobs": self._logprobs(comp.token_ids, comp.logprobs), "finish_reason": None}
        if comp.finish_reason is not None:
            choice.update(finish_reason=comp.finish_reason, stop_reason=comp.stop_reason)
            ch.done = True
        choice["token_ids"] = list(comp.token_ids) if self.req.return_token_ids else None
        events.append(self._chunk([choice], len(ch.ids)))
        return events

    def _open(self) -> list[dict]:
        req, events = self.req, []
        for i, ch in enumerate(self.choices):
            ch.started = True
            event = self._chunk([{"index": i, "delta": {"role": req.role, "content": ""}, "logprobs": None,
                                  "finish_reason": None}], 0)
            event["prompt_token_ids"] = list(self.prompt_ids) if req.return_token_ids else None
            event["prompt_text"] = req.rendered.text if req.return_prompt_text else None
            events.append(event)
        if req.echoed:
            events += [self._chunk([{"index": i, "delta": {"content": req.echoed}, "logprobs": None,
                                     "finish_reason": None}], 0) for i in range(req.n)]
        return events

    def _chunk(self, choices: list, generated: int) -> dict:
        event = {"id": self.id, "object": CHUNK, "created": self.created, "model": self.model, "choices": choices}
        if self.req.continuous_usage:
            event["usage"] = {**self.usage(generated), "completion_tokens_details": None}
        return event

    def usage_event(self) -> dict:
        """The last chunk with stream_options.include_usage: no choices, the usage (vLLM drops its nulls)."""
        return {"id": self.id, "object": CHUNK, "created": self.created, "model": self.model, "choices": [],
                "usage": self.usage()}


__all__ = ["ChatAnswer", "chat_logprobs"]
