"""vLLM's `/v1/completions` answer built from the engine's outputs (completions_route.py runs the request).

The shapes are vLLM 0.32's (`vllm/entrypoints/openai/serving_completion.py` and `protocol.py`):

- answered whole: `{"id": "cmpl-...", "object": "text_completion", "created", "model", "choices": [{"index", "text",
  "logprobs", "finish_reason", "stop_reason", "token_ids", "prompt_logprobs", "prompt_token_ids", "routed_experts":
  null}], "service_tier": null, "system_fingerprint": null, "usage": {"prompt_tokens", "total_tokens",
  "completion_tokens", "prompt_tokens_details": null, "completion_tokens_details": null}, "kv_transfer_params": null,
  "ec_transfer_params": null, "metrics": null}` (the last two, `routed_experts` and `completion_tokens_details`: vLLM
  0.32's fields for encoder-cache transfer, per-request metrics, routed experts and reasoning tokens, null as vLLM
  answers them without the flags that fill them), choices prompt by prompt, each prompt's n samples together;
- `logprobs`: `{"text_offset", "token_logprobs", "tokens", "top_logprobs"}`, one entry per token; each token as its
  own decoded text (the engine's `decoded_token`), `top_logprobs` the position's whole entry (the token itself
  first, then the top-n by rank: n + 1 names at most, as vLLM keeps them), logprobs clamped at -9999.0; a position
  without logprobs (the first prompt token) has a null logprob and a null top entry; `text_offset` counts the token
  texts' lengths from the start of the answer's text (a stream's from the choice's text so far);
- `echo`: the prompt's text (a token-id prompt's decoded) comes before the generated text, and its tokens'
  entries before the generated ones'; with max_tokens 0 the prompt alone (the engine's one token dropped from the
  text, counted in `usage`, as vLLM counts it);
- `prompt_logprobs`: the engine's, `{"<token id>": {"logprob", "rank", "decoded_token"}}` per position (null first);
- streamed: one `data:` event per engine delta of each choice (`"object": "text_completion"`, no `usage` key), its
  `finish_reason` and `stop_reason` on the choice's last; the first of each choice carries the echo; with
  `stream_options.include_usage` a last event of no choices and the usage; `data: [DONE]` ends it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .completions_request import CompletionRequest

MIN_WIRE_LOGPROB = -9999.0  # vLLM's (and serving.wire_logprob's) clamp of -inf, which JSON cannot carry


def wire(logprob: float) -> float:
    return max(logprob, MIN_WIRE_LOGPROB)


def vllm_order(entry: dict, token: int) -> list:
    """A position's (token id, Logprob) pairs in vLLM's order: the token itself, then the rest by rank."""
    rest = sorted(((t, lp) for t, lp in entry.items() if t != token), key=lambda kv: kv[1].rank)
    return ([(token, entry[token])] if token in entry else []) + rest


def completion_logprobs(token_ids, entries, decode: Callable[[int], str], offset: int = 0,
                        as_ids: bool = False) -> dict:
    """vLLM's CompletionLogProbs of `token_ids` (`entries[i]`: position i's {token id: Logprob}, or None).
    `decode(token_id)`: a token's own text, where the engine gave none; `offset`: the first token's text_offset;
    `as_ids`: each token named `token_id:N` (token_text)."""
    offsets: list[int] = []
    logprobs: list[Optional[float]] = []
    tokens: list[str] = []
    tops: list[Optional[dict]] = []
    last = 0
    for i, tid in enumerate(token_ids):
        entry = entries[i] if i < len(entries) else None
        if entry is None or tid not in entry:
            text = token_text(tid, None, decode, as_ids)
            logprobs.append(None)
            tops.append(None)
        else:
            text = token_text(tid, entry[tid], decode, as_ids)
            logprobs.append(wire(entry[tid].logprob))
            tops.append({token_text(t, lp, decode, as_ids): wire(lp.logprob) for t, lp in vllm_order(entry, tid)})
        tokens.append(text)
        offsets.append(offset if not offsets else offsets[-1] + last)
        last = len(text)  # vLLM's: the token string's length, `token_id:N`'s too
    return {"text_offset": offsets, "token_logprobs": logprobs, "tokens": tokens, "top_logprobs": tops}


def prompt_logprobs_json(entries: Optional[list], token_ids: list) -> Optional[list]:
    """The engine's prompt logprobs as vLLM serializes them: per position null or {"<id>": {"logprob", "rank",
    "decoded_token"}}, the prompt's own token first, then the top-n by rank."""
    if entries is None:
        return None
    return [None if entry is None else
            {str(t): {"logprob": wire(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
             for t, lp in vllm_order(entry, tid)} for tid, entry in zip(token_ids, entries)]


TOKEN_ID_PREFIX = "token_id:"  # vLLM's format_token_id_placeholder


def token_text(token: int, lp, decode: Callable[[int], str], as_ids: bool = False) -> str:
    """How a logprobs entry names its token: the one place, for /v1/completions' `tokens` and `top_logprobs` keys and
    chat's `token` (vLLM's `_get_decoded_token`). `as_ids` (--return-tokens-as-token-ids, or a request's
    `return_tokens_as_token_ids`, which wins): `token_id:N`, so that a token that is no whole UTF-8 text (a byte
    piece) is named; else the token's own text, the engine's `decoded_token` (`lp`, a Logprob or None), else
    `decode(token)`. The answer's `text` is text either way, as vLLM's."""
    if as_ids:
        return f"{TOKEN_ID_PREFIX}{token}"
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else decode(token)


@dataclass
class _Prompt:
    text: Optional[str]  # as given (a text prompt), else decoded when first needed
    ids: list = field(default_factory=list)
    logprobs: Optional[list] = None  # the engine's prompt logprobs (from sample 0)
    seen: bool = False


@dataclass
class ChoiceSoFar:
    """One choice's outputs so far (completions' and chat's): texts, token ids, logprob entries, how it ended."""

    text: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Any = None

    def take(self, comp) -> None:
        """One delta CompletionOutput of this choice."""
        self.text.append(comp.text)
        self.ids.extend(comp.token_ids)
        if comp.logprobs:
            self.logprobs.extend(comp.logprobs)
        if comp.finish_reason is not None:
            self.finish_reason, self.stop_reason = comp.finish_reason, comp.stop_reason


@dataclass
class _Choice(ChoiceSoFar):
    echoed: bool = False  # streamed: the echo (or the prompt's ids) sent
    sent_chars: int = 0  # streamed: the text sent so far (the next text_offset)
    generated: int = 0  # streamed: the tokens generated so far
    pending: list = field(default_factory=list)  # streamed: outputs held until the prompt's logprobs came


class CompletionAnswer:
    """Every choice of one completions request, fed the engine's delta outputs as they come (`add` for an answer
    sent whole, `chunks` for a stream)."""

    def __init__(self, req: CompletionRequest, model: str, created: int, decode_one: Callable[[int], str],
                 decode_prompt: Callable[[list], str], as_ids: bool = False):
        """`as_ids`: the logprobs' tokens as `token_id:N` (token_text)."""
        self.req, self.model, self.created, self.as_ids = req, model, created, as_ids
        self.id = f"cmpl-{req.base_id}"
        self.decode_one, self.decode_prompt = decode_one, decode_prompt
        self.prompts = [_Prompt(p.prompt if isinstance(p.prompt, str) else None) for p in req.prompts]
        self.choices = [_Choice() for _ in range(len(req.prompts) * req.n)]

    def _seen(self, prompt: int, out) -> _Prompt:
        p = self.prompts[prompt]
        if not p.seen:
            p.ids, p.seen = list(out.prompt_token_ids), True
        if p.logprobs is None and out.prompt_logprobs is not None:
            p.logprobs = out.prompt_logprobs
        return p

    def _prompt_text(self, p: _Prompt) -> str:
        if p.text is None:
            p.text = self.decode_prompt(p.ids)
        return p.text

    def add(self, prompt: int, sample: int, out) -> None:
        """One delta output of choice (prompt, sample), kept for the whole answer."""
        self._seen(prompt, out)
        self.choices[self.req.index(prompt, sample)].take(out.outputs[0])

    def body(self) -> dict:
        """The whole answer (vLLM's CompletionResponse)."""
        req, choices = self.req, []
        for i, ch in enumerate(self.choices):
            p = self.prompts[i // req.n]
            text, ids, entries = "".join(ch.text), ch.ids, ch.logprobs
            if req.echo:
                prompt_text = "" if req.return_token_ids else self._prompt_text(p)
                prompt_entries = p.logprobs if p.logprobs is not None else [None] * len(p.ids)
                if req.prompt_only:
                    text, ids, entries = prompt_text, p.ids, prompt_entries
                else:
                    text, ids, entries = prompt_text + text, p.ids + ids, list(prompt_entries) + entries
            choices.append({
                "index": i, "text": text,
                "logprobs": completion_logprobs(ids, entries, self.decode_one, 0, self.as_ids)
                if req.logprobs is not None else None,
                "finish_reason": ch.finish_reason, "stop_reason": ch.stop_reason,
                "token_ids": list(ch.ids) if req.return_token_ids else None,
                "prompt_logprobs": prompt_logprobs_json(p.logprobs, p.ids),
                "prompt_token_ids": list(p.ids) if req.return_token_ids else None, "routed_experts": None})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "service_tier": None, "system_fingerprint": None, "usage": self.usage(),
                "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}

    def usage(self) -> dict:
        prompt = sum(len(p.ids) for p in self.prompts)
        done = sum(len(ch.ids) + ch.generated for ch in self.choices)  # kept whole, or streamed
        return {"prompt_tokens": prompt, "total_tokens": prompt + done, "completion_tokens": done,
                "prompt_tokens_details": None, "completion_tokens_details": None}

    def chunks(self, prompt: int, sample: int, out) -> list[dict]:
        """The stream events (as dicts) this delta output of choice (prompt, sample) makes: none while its echo waits
        for the prompt's logprobs (computed by sample 0 alone), several when they arrive."""
        p = self._seen(prompt, out)
        i = self.req.index(prompt, sample)
        ch = self.choices[i]
        waits = self.req.echo and self.req.logprobs is not None and p.logprobs is None
        if waits and not ch.echoed:
            ch.pending.append(out)
            return []
        events = [self._event(i, prompt, out)]
        for j in range(prompt * self.req.n, (prompt + 1) * self.req.n):  # siblings held for the logprobs
            held, self.choices[j].pending = self.choices[j].pending, []
            events += [self._event(j, prompt, o) for o in held]
        return [e for e in events if e is not None]

    def flush(self) -> list[dict]:
        """The events still held at the stream's end (a prompt whose logprobs never came)."""
        events = []
        for j, ch in enumerate(self.choices):
            held, ch.pending = ch.pending, []
            events += [self._event(j, j // self.req.n, o) for o in held]
        return [e for e in events if e is not None]

    def _event(self, i: int, prompt: int, out) -> Optional[dict]:
        """vLLM's CompletionStreamResponse for one delta of choice i, or None (an empty delta before any token)."""
        req, ch, p, comp = self.req, self.choices[i], self.prompts[prompt], out.outputs[0]
        prompt_ids = None
        if req.echo and not ch.echoed:
            prompt_text = "" if req.return_token_ids else self._prompt_text(p)
            prompt_entries = p.logprobs if p.logprobs is not None else [None] * len(p.ids)
            if req.prompt_only:
                text, ids, entries = prompt_text, p.ids, prompt_entries
            else:
                text, ids = prompt_text + comp.text, p.ids + list(comp.token_ids)
                entries = list(prompt_entries) + list(comp.logprobs or [])
            prompt_ids, ch.echoed = p.ids, True
        else:
            text, ids, entries = comp.text, comp.token_ids, comp.logprobs or []
            if not ch.echoed and req.return_token_ids:
                prompt_ids, ch.echoed = p.ids, True
            if not text and not ids and not ch.generated and comp.finish_reason is None:
                return None
        logprobs = completion_logprobs(ids, entries, self.decode_one, ch.sent_chars, self.as_ids) \
            if req.logprobs is not None else None
        ch.sent_chars += len(text)
        ch.generated += len(comp.token_ids)
        choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": comp.finish_reason,
                  "stop_reason": comp.stop_reason, "prompt_token_ids": list(prompt_ids) if prompt_ids else None,
                  "token_ids": list(comp.token_ids) if req.return_token_ids else None}
        event = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                 "choices": [choice]}
        if req.continuous_usage:
            n = len(p.ids)
            event["usage"] = {"prompt_tokens": n, "completion_tokens": ch.generated, "total_tokens": n + ch.generated}
        return event

    def usage_event(self) -> dict:
        """The last event with stream_options.include_usage: no choices, the usage (vLLM drops its nulls)."""
        usage = {k: v for k, v in self.usage().items() if v is not None}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": usage}


__all__ = ["ChoiceSoFar", "CompletionAnswer", "MIN_WIRE_LOGPROB", "TOKEN_ID_PREFIX", "completion_logprobs",
           "prompt_logprobs_json", "token_text", "vllm_order", "wire"]
