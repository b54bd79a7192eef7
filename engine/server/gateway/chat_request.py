"""The body of vLLM's `POST /v1/chat/completions` read into one moelink request (chat_route.py answers it;
docs/vllm-compat.md#v1chatcompletions).

vLLM's request (its `ChatCompletionRequest`, vLLM 0.32): `messages` rendered by the front with the server's chat
template (chat_render.py: any role the template takes, `add_generation_prompt`, `continue_final_message`,
`chat_template_kwargs`, `documents`, `reasoning_effort`, `add_special_tokens`, `tools` with `tool_choice: "none"`);
the sampling fields completions reads (completions_request.SAMPLING) with the checkpoint's generation_config for
those left out; `max_completion_tokens` or `max_tokens` (left out: up to the context, as vLLM; past the context left
by the prompt: capped, as vLLM caps it; past max_model_len: 400), `logprobs` (true/false) with `top_logprobs`,
`prompt_logprobs` (`echo` asks them as vLLM does: prompt_logprobs = top_logprobs), `echo`, `stream`,
`stream_options`, `return_token_ids`, `return_prompt_text`, `truncate_prompt_tokens`, `request_id`, `user` and
`session_id` (taken, not used: vLLM logs the one and routes by the other).

What the front answers and what it relays to smg (`claims`): smg keeps what only it carries: tool calling (`tools`
with a `tool_choice` other than "none"), a server started with `--reasoning-parser` (smg splits `reasoning_content`
out), vLLM's structured-output fields and `response_format` (RELAYED_FIELDS), and messages with image, video or
audio parts. Everything else is answered here. A REFUSED field set to anything but its neutral value is
HTTP 400 naming it, relayed or not: the engine cannot do it, and it is never ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from ...contract.safe_text import shown
from ...contract.sampling_params import SamplingParams
from .chat_render import RenderedChat, has_media, render_chat
from . import answer_budget
from .completions_request import (REFUSED as COMPLETIONS_REFUSED, SAMPLING, Prompt, RELAYED_FIELDS as
                                  COMPLETIONS_RELAYED, check_request_id, check_stops, is_int, logprob_count,
                                  read_stream_options, logit_bias_field, refuse_non_neutral, renamed_error,
                                  sampling_fields)
from .json_body import json_flag
from .openai_fields import HttpFieldError

# vLLM's fields that set no sampling parameter and that the front reads.
LOCAL_FIELDS = frozenset(SAMPLING) | {
    "model", "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "echo", "prompt_logprobs",
    "stream", "stream_options", "user", "session_id", "return_token_ids", "return_prompt_text",
    "truncate_prompt_tokens", "request_id", "add_generation_prompt", "continue_final_message", "add_special_tokens",
    "chat_template_kwargs", "documents", "reasoning_effort", "include_reasoning", "tools", "tool_choice",
    "parallel_tool_calls", "logit_bias", "return_tokens_as_token_ids",
    # vLLM reads these on its /render routes only and takes them on a chat, without effect: so does the front
    "return_token_offsets", "mm_payload", "return_mm_kwargs"}
_SAME_AS_COMPLETIONS = ("use_beam_search", "length_penalty", "logprob_token_ids", "priority", "cache_salt", "kv_transfer_params", "vllm_xargs",
                        "watermarking", "stream_interval")
# vLLM's fields the front cannot honour: field -> (its neutral values, why). Neutral: taken; anything else: 400.
REFUSED = {key: COMPLETIONS_REFUSED[key] for key in _SAME_AS_COMPLETIONS} | {
    "chat_template": ((None,), "a request's own chat template is not taken (vLLM refuses it too unless started "
                               "with --trust-request-chat-template): the server's is used"),
    "ec_transfer_params": ((None,), "moelink has no encoder-cache transfer"),
    "media_io_kwargs": ((None, {}), "image, video and audio parts are read by the server's own settings"),
    "mm_processor_kwargs": ((None, {}), "image, video and audio parts are read by the server's own settings"),
    "thinking_token_budget": ((None,), "it needs a reasoning parser, which smg applies (--reasoning-parser)"),
    "repetition_detection": ((None,), "moelink has no repetition detection"),
    "routed_experts_prompt_start": ((None, 0), "routed experts are returned by the gRPC services and /generate"),
    "truncation_side": ((None, "left"), "truncate_prompt_tokens keeps the last tokens (left), as vLLM's default"),
}
# What only smg carries: vLLM's structured-output fields (openai_fields.rewrite carries them to smg) and
# response_format (smg builds the engine's constraint from it).
RELAYED_FIELDS = COMPLETIONS_RELAYED | {"response_format"}


@dataclass(frozen=True)
class ChatRequest:
    prompts: tuple[Prompt, ...]  # the rendered chat, as token ids (one prompt: completions_route's shape)
    params: SamplingParams  # sample 0's (n = 1); Serving.run makes the n samples
    n: int
    logprobs: bool
    top_logprobs: int
    echo: bool
    stream: bool
    include_usage: bool
    continuous_usage: bool
    return_token_ids: bool
    return_prompt_text: bool
    keep: Optional[int]  # truncate_prompt_tokens: the last `keep` prompt tokens
    lora: Optional[str]  # the served adapter `model` names, or None
    base_id: str  # the answer's id is `chatcmpl-{base_id}`
    rendered: RenderedChat
    role: str  # the answer's role: "assistant", or the last message's without a generation prompt (vLLM's)
    # return_tokens_as_token_ids: the logprobs' tokens as `token_id:N` (true), as text (false), or the server's
    # --return-tokens-as-token-ids (None)
    tokens_as_ids: Optional[bool] = None

    @property
    def echoed(self) -> str:
        """What `echo` puts before each choice's content: the last message's, when it has the answer's role."""
        last = self.rendered.messages[-1]
        return (last.get("content") or "") if self.echo and last.get("role") == self.role else ""


def calls_tools(data: dict) -> bool:
    """Whether the request asks for tool calls (smg's parsers read them): `tools` with a tool_choice other than
    "none" (vLLM's default with tools is "auto"), or any tool_choice but "none"."""
    choice = data.get("tool_choice")
    return choice not in (None, "none") or (bool(data.get("tools")) and choice is None)


def refused_field(data: Any) -> None:
    """HTTP 400 naming a REFUSED field set to another value than its neutral one: checked before a body
    is relayed too, so smg never drops one."""
    if isinstance(data, dict):
        refuse_non_neutral(data, REFUSED)


def unknown_field(data: Any) -> Optional[str]:
    """The first field of a chat body that neither the front nor the gateway reads: answered 400 naming it."""
    if not isinstance(data, dict):
        return None
    return next((k for k in data if k not in LOCAL_FIELDS and k not in REFUSED and k not in RELAYED_FIELDS), None)


def claims(data: Any, relay_all: bool = False) -> bool:
    """Whether the front answers this chat body itself. `relay_all`: the server has a reasoning parser (smg's)."""
    if relay_all or not isinstance(data, dict) or calls_tools(data) or has_media(data.get("messages")):
        return False
    fmt = data.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        return False
    return all(k in LOCAL_FIELDS or k in REFUSED for k in data if k != "response_format")


def read_request(data: dict, serving, tokenizer, lora: Optional[str], base_id: str) -> ChatRequest:
    """The request, its chat rendered by `tokenizer`'s template and checked against the server's limits
    (`serving`: --max-logprobs, --max-n, stop lists, max_model_len). `lora`: the adapter `model` names."""
    refused_field(data)
    check_request_id(data, serving.limits)
    stream = json_flag(data, "stream")
    options = data.get("stream_options")
    if options and not stream:  # vLLM's test: an empty object is taken
        raise HttpFieldError("stream_options", "Stream options can only be defined when `stream=True`.")
    include_usage, continuous = read_stream_options(options or None)
    continuous = continuous and include_usage  # vLLM's should_include_usage
    limits = serving.limits
    logprobs = json_flag(data, "logprobs")
    top = logprob_count(data, "top_logprobs", limits.max_logprobs) or 0
    if top and not logprobs:
        raise HttpFieldError("top_logprobs", "when using `top_logprobs`, `logprobs` must be set to true.")
    prompt_logprobs = logprob_count(data, "prompt_logprobs", limits.max_logprobs)
    if prompt_logprobs and stream:
        raise HttpFieldError("prompt_logprobs", "`prompt_logprobs` are not available when `stream=True`.")
    echo = json_flag(data, "echo")
    if prompt_logprobs is None and echo:
        prompt_logprobs = top  # vLLM's: echo scores the prompt
    fields = sampling_fields(data, limits)
    for key, value in serving.info.sampling_defaults.items():  # the checkpoint's, for the fields left out (vLLM's)
        if key != "max_tokens" and key not in fields:
            fields[key] = value
    bias = logit_bias_field(data.get("logit_bias"), limits)
    if bias:
        fields["logit_bias"] = bias
    check_stops(limits, fields)
    keep = _keep(data.get("truncate_prompt_tokens"))
    rendered = render_chat(tokenizer, serving, data, _tools(data))
    fields.update(max_tokens=_max_tokens(data, serving, len(rendered.ids), keep),
                  logprobs=top if logprobs else None, prompt_logprobs=prompt_logprobs)
    try:
        params = SamplingParams(**fields)
        limits.check_n(params.n)
    except ValueError as e:
        raise renamed_error(str(e), data) from None
    if not stream:  # the answer's size against --max-answer-bytes (answer_budget.py), before anything runs
        est = answer_budget.estimate([len(rendered.ids)], params.n, params.max_tokens, answer_budget.CHAT_LOGPROB,
                                     top if logprobs else None, prompt_logprobs)
        answer_budget.check(limits, est, f"n={params.n} x max_tokens={params.max_tokens} (max_completion_tokens, "
                                         f"else the context the prompt leaves), top_logprobs="
                                         f"{top if logprobs else None}, prompt_logprobs={prompt_logprobs}, a "
                                         f"prompt of {len(rendered.ids)} tokens")
    role = "assistant" if rendered.add_generation_prompt else rendered.messages[-1]["role"]
    prompt = Prompt(list(rendered.ids), "messages", serving.request_id(f"chatcmpl-{base_id}"))
    as_ids = data.get("return_tokens_as_token_ids")
    if as_ids is not None and not isinstance(as_ids, bool):
        raise HttpFieldError("return_tokens_as_token_ids", "return_tokens_as_token_ids must be true, false or null.")
    return ChatRequest((prompt,), params.sample(0), params.n, logprobs, top, echo, stream, include_usage,
                       continuous, json_flag(data, "return_token_ids"), json_flag(data, "return_prompt_text"), keep,
                       lora, base_id, rendered, role, as_ids)


def _keep(value: Any) -> Optional[int]:
    """truncate_prompt_tokens: None or -1 (vLLM's: up to max_model_len, which a prompt must fit anyway) keep every
    token; N >= 1 the last N."""
    if value is None or value == -1:
        return None
    if not is_int(value) or value < 1:
        raise HttpFieldError("truncate_prompt_tokens", "truncate_prompt_tokens must be -1 or an integer >= 1 (the "
                                                       "last N prompt tokens are kept).")
    return value


def _tools(data: dict) -> Optional[list]:
    """The tools a request without tool calls (tool_choice "none") still shows the template, as vLLM does."""
    tools = data.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools or not all(isinstance(t, dict) for t in tools):
        raise HttpFieldError("tools", "tools must be a non-empty list of tool objects (or left out).")
    return tools


def _max_tokens(data: dict, serving, prompt_len: int, keep: Optional[int]) -> int:
    """vLLM's get_max_tokens: max_completion_tokens, else max_tokens, else the checkpoint's max_new_tokens, each
    capped at the context the prompt leaves; none given: that context. Past max_model_len: refused (vLLM's)."""
    key = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    given = data.get(key)
    most = serving.info.max_model_len
    if given is not None and (not is_int(given) or given < 1):
        raise HttpFieldError(key, f"{key}={shown(json.dumps(given))} is invalid: an integer >= 1.")
    if given is not None and given > most:
        raise HttpFieldError(key, f"{key}={given} cannot be greater than max_model_len={most}. Please request fewer "
                                  "output tokens.")
    room = most - (prompt_len if keep is None else min(prompt_len, keep))
    if room < 1:
        raise HttpFieldError("messages", f"the rendered chat has {prompt_len} tokens: max_model_len={most} leaves "
                                         "no room for an answer.")
    fallback = given if given is not None else serving.info.sampling_defaults.get("max_tokens")
    return room if fallback is None else min(room, fallback)


__all__ = ["ChatRequest", "LOCAL_FIELDS", "REFUSED", "RELAYED_FIELDS", "calls_tools", "claims",
           "read_request", "refused_field", "unknown_field"]
