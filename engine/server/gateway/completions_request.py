"""The body of vLLM's `POST /v1/completions` read into moelink's requests (completions_route.py answers them;
docs/vllm-compat.md#v1completions).

vLLM's request (its `CompletionRequest`, vLLM 0.32): `prompt` a string, a list of strings, a list of token ids or a
list of token-id lists (each one prompt, `n` samples each); `max_tokens` (default 16; 0 only with `echo`: the prompt
alone is answered, the engine still runs one step, as vLLM runs it), the sampling fields (`temperature`, `top_p`,
`top_k`, `min_p`, `seed`, penalties, `min_tokens`, `stop`, `stop_token_ids`, `ignore_eos`,
`include_stop_str_in_output`, `skip_special_tokens`, `spaces_between_special_tokens`, `logit_bias` (keys token-id
strings, biases clamped to [-100, 100] as vLLM's server does), `allowed_token_ids`, `bad_words`), `logprobs` (top-n per token), `echo`, `prompt_logprobs`
(`echo` with `logprobs` asks them as vLLM does: prompt_logprobs = logprobs), `stream`, `stream_options`
(`include_usage`, `continuous_usage_stats`), `return_token_ids`, `truncate_prompt_tokens`, `request_id`, `user`
(taken, not used: vLLM logs it), `model` (a served name, an alias or a served LoRA adapter; another name is 404),
`return_tokens_as_token_ids` (the logprobs' tokens as `token_id:N`; null: the server's --return-tokens-as-token-ids).

What the front answers here and what it relays (`claims`): a body whose every field is one of LOCAL_FIELDS or
REFUSED is answered here; one with another field (the structured-output fields smg carries, `response_format`,
SGLang's `regex` / `ebnf`, or a field neither knows) goes to smg as before (http_front.py). A REFUSED field set to
anything but its neutral value is HTTP 400 naming it: the engine cannot do it, and it is never ignored.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from ...contract.safe_text import shown
from ...contract.sampling_params import SamplingParams
from .json_body import json_flag, kind_of
from .openai_fields import GUIDED, SMG_CONSTRAINTS, HttpFieldError

VLLM_MAX_TOKENS = 16  # vLLM's default max_tokens for /v1/completions
# Request field -> (SamplingParams field, JSON kind): read as given.
SAMPLING = {"temperature": ("temperature", "number"), "top_p": ("top_p", "number"), "top_k": ("top_k", "int"),
            "min_p": ("min_p", "number"), "seed": ("seed", "int"), "n": ("n", "int"),
            "repetition_penalty": ("repetition_penalty", "number"),
            "presence_penalty": ("presence_penalty", "number"), "frequency_penalty": ("frequency_penalty", "number"),
            "min_tokens": ("min_tokens", "int"), "stop": ("stop", "strs"), "stop_token_ids": ("stop_token_ids", "ints"),
            "ignore_eos": ("ignore_eos", "bool"), "include_stop_str_in_output": ("include_stop_str_in_output", "bool"),
            "skip_special_tokens": ("skip_special_tokens", "bool"),
            "spaces_between_special_tokens": ("spaces_between_special_tokens", "bool"),
            "allowed_token_ids": ("allowed_token_ids", "ints"), "bad_words": ("bad_words", "strs")}
LOCAL_FIELDS = frozenset(SAMPLING) | {"model", "prompt", "max_tokens", "logprobs", "echo", "prompt_logprobs", "stream",
                                      "stream_options", "user", "return_token_ids", "truncate_prompt_tokens",
                                      "request_id", "logit_bias", "return_tokens_as_token_ids"}
# vLLM's fields the engine cannot honour: field -> (its neutral values, why). Neutral: taken; anything else: 400.
REFUSED = {
    "suffix": ((None, ""), "moelink's models take no suffix (vLLM refuses it for every model it serves too)"),
    "use_beam_search": ((None, False), "moelink has no beam search"),
    "length_penalty": ((None, 1, 1.0), "it applies to beam search, which moelink has not"),
    "logprob_token_ids": ((None,), "moelink returns the top-n logprobs (`logprobs`), not chosen tokens'"),
    # Read here (the logprobs' tokens as `token_id:N`, completions_answer.token_text); kept in this table for the
    # chat route, which refuses it (chat_request.REFUSED takes its entries from here) until it calls token_text too.
    "return_tokens_as_token_ids": ((None, False), "tokens are answered as text"),
    "prompt_embeds": ((None,), "moelink takes text or token ids"),
    "add_special_tokens": ((None, True), "text prompts are tokenized with the model's special tokens; send token "
                                         "ids for another tokenization"),
    "priority": ((None, 0), "moelink's scheduler shares by client, not by priority"),
    "cache_salt": ((None,), "moelink's prefix cache takes no salt"),
    "kv_transfer_params": ((None,), "a prefill/decode pair is driven through the gateway's PD mode"),
    "vllm_xargs": ((None, {}), "moelink takes no extension arguments"),
    "watermarking": ((None, False), "moelink has no watermarking"),
    "stream_interval": ((None, 1), "each engine step's tokens are streamed as they come"),
}


@dataclass(frozen=True)
class Prompt:
    """One prompt of a completions request: one moelink request of `n` samples."""

    prompt: Any  # text or token ids
    field: str  # what errors about it name: "prompt", "prompt[1]"
    rid: str


@dataclass(frozen=True)
class CompletionRequest:
    prompts: tuple[Prompt, ...]
    params: SamplingParams  # sample 0's (n = 1); Serving.run makes the n samples
    n: int
    echo: bool
    logprobs: Optional[int]  # top-n per token in the answer's `logprobs`, or None: `logprobs` null
    prompt_only: bool  # max_tokens 0 with echo: the prompt alone is answered
    stream: bool
    include_usage: bool
    continuous_usage: bool
    return_token_ids: bool
    keep: Optional[int]  # truncate_prompt_tokens: the last `keep` prompt tokens
    lora: Optional[str]  # the served adapter `model` names, or None
    base_id: str  # the answer's id is `cmpl-{base_id}`
    # return_tokens_as_token_ids: the logprobs' tokens as `token_id:N` (true), as text (false), or the server's
    # --return-tokens-as-token-ids (None, vLLM's default)
    tokens_as_ids: Optional[bool] = None

    def index(self, prompt: int, sample: int) -> int:
        """A choice's place: prompt by prompt, each prompt's samples together (vLLM's)."""
        return prompt * self.n + sample


# The structured-output fields smg builds its constraint from, which the front carries to it (openai_fields.py): a
# completions body with one of them is relayed, the gateway's answer shape with it.
RELAYED_FIELDS = frozenset({"structured_outputs", *GUIDED, *SMG_CONSTRAINTS, "guided_decoding_backend",
                            "guided_whitespace_pattern"})


def unknown_field(data: Any) -> Optional[str]:
    """The first field of a completions body that neither the front (LOCAL_FIELDS, REFUSED) nor the gateway
    (RELAYED_FIELDS) reads: answered 400 naming it, never dropped (vLLM logs such a field and ignores it)."""
    if not isinstance(data, dict):
        return None
    return next((k for k in data if k not in LOCAL_FIELDS and k not in REFUSED and k not in RELAYED_FIELDS), None)


def claims(data: Any) -> bool:
    """Whether the front answers this completions body itself (every field one it reads or refuses)."""
    return isinstance(data, dict) and all(k in LOCAL_FIELDS or k in REFUSED for k in data)


def read_request(data: dict, serving, lora: Optional[str], base_id: str) -> CompletionRequest:
    """The request, checked against the server's limits (`serving`: --max-logprobs, --max-n, stop lists). `lora`: the
    adapter `model` names (already looked up)."""
    refuse_non_neutral(data, {k: v for k, v in REFUSED.items() if k not in LOCAL_FIELDS})
    stream = json_flag(data, "stream")
    echo = json_flag(data, "echo")
    options = data.get("stream_options")
    if options is not None and not stream:
        raise HttpFieldError("stream_options", "Stream options can only be defined when `stream=True`.")
    include_usage, continuous = read_stream_options(options)
    limits = serving.limits
    logprobs = logprob_count(data, "logprobs", limits.max_logprobs)
    prompt_logprobs = logprob_count(data, "prompt_logprobs", limits.max_logprobs)
    if prompt_logprobs is not None and stream and prompt_logprobs > 0:
        raise HttpFieldError("prompt_logprobs", "`prompt_logprobs` are not available when `stream=True`.")
    if prompt_logprobs is None and echo:
        prompt_logprobs = logprobs  # vLLM: echo scores the prompt as it scores the output
    max_tokens = data.get("max_tokens")
    max_tokens = VLLM_MAX_TOKENS if max_tokens is None else max_tokens
    if not is_int(max_tokens) or max_tokens < 0 or (max_tokens == 0 and not echo):
        raise HttpFieldError("max_tokens", f"max_tokens={shown(json.dumps(max_tokens))} is invalid: an integer >= 1 "
                                           "(0 only with echo: the prompt alone is answered).")
    fields = sampling_fields(data)
    bias = logit_bias_field(data.get("logit_bias"))
    if bias:
        fields["logit_bias"] = bias
    for key, value in serving.info.sampling_defaults.items():  # the checkpoint's, for the fields left out (vLLM's)
        if key != "max_tokens" and key not in fields:
            fields[key] = value
    check_stops(limits, fields)
    fields.update(max_tokens=max(max_tokens, 1), logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    try:
        params = SamplingParams(**fields)
        limits.check_n(params.n)
    except ValueError as e:
        raise renamed_error(str(e), data) from None
    prompts = _prompts(data.get("prompt"), params.n, limits.max_batch_sequences, serving, base_id)
    keep = data.get("truncate_prompt_tokens")
    if keep is not None and (not is_int(keep) or keep < 1):
        raise HttpFieldError("truncate_prompt_tokens", "truncate_prompt_tokens must be an integer >= 1 (the last N "
                                                       "prompt tokens are kept).")
    as_ids = data.get("return_tokens_as_token_ids")
    if as_ids is not None and not isinstance(as_ids, bool):
        raise HttpFieldError("return_tokens_as_token_ids", "return_tokens_as_token_ids must be true, false or null.")
    return CompletionRequest(prompts, params.sample(0), params.n, echo, logprobs, max_tokens == 0, stream,
                             include_usage, continuous, json_flag(data, "return_token_ids"), keep, lora, base_id,
                             as_ids)


def refuse_non_neutral(data: dict, refused: dict) -> None:
    """HTTP 400 naming the first field of `refused` (field -> (its neutral values, why)) set to another value."""
    for key, (neutral, why) in refused.items():
        value = data.get(key)
        if value is not None and not any(value == v and type(value) is type(v) for v in neutral):
            raise HttpFieldError(key, f"{key}={shown(json.dumps(value))} is not supported: {why}.")


def read_stream_options(options: Any) -> tuple[bool, bool]:
    if options is None:
        return False, False
    if not isinstance(options, dict):
        raise HttpFieldError("stream_options", f"stream_options must be an object, not {kind_of(options)}.")
    for key in options:
        if key not in ("include_usage", "continuous_usage_stats"):
            raise HttpFieldError(f"stream_options.{key}", f"stream_options.{shown(key)} is not supported: "
                                                          "include_usage, continuous_usage_stats.")
    return json_flag(options, "include_usage"), json_flag(options, "continuous_usage_stats")


def logprob_count(data: dict, name: str, most: int) -> Optional[int]:
    """`logprobs` / `prompt_logprobs`: None, or an integer 0..most (-1, the whole vocabulary, is refused)."""
    value = data.get(name)
    if value is None:
        return None
    if not is_int(value) or not 0 <= value <= most:
        raise HttpFieldError(name, f"{name}={shown(json.dumps(value))} is invalid: an integer from 0 to {most} (the "
                                   f"top logprobs per token, --max-logprobs).")
    return value


def _prompts(prompt: Any, n: int, most: int, serving, base_id: str) -> tuple[Prompt, ...]:
    """Each prompt of `prompt` (vLLM's four shapes), its request id `cmpl-{base_id}-{i}` as vLLM numbers them."""
    if isinstance(prompt, str):
        if not prompt:
            raise HttpFieldError("prompt", "Either prompt or prompt_embeds must be provided and non-empty.")
        given, batch = [prompt], False
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        given, batch = [prompt], False
    elif isinstance(prompt, list) and prompt:
        given, batch = prompt, True
    else:
        raise HttpFieldError("prompt", "prompt must be a non-empty string, a list of strings, a list of token ids or "
                                       f"a list of token-id lists, not {kind_of(prompt)}.")
    if len(given) * n > most:
        raise HttpFieldError("prompt", f"prompt has {len(given)} prompts x n={n} samples = {len(given) * n} "
                                       f"sequences: at most {most} in one request (--max-batch-sequences).")
    out = []
    for i, one in enumerate(given):
        field = f"prompt[{i}]" if batch else "prompt"
        ok = (isinstance(one, str) and one) or (isinstance(one, list) and one and all(is_int(t) for t in one))
        if not ok or (batch and isinstance(given[0], str) != isinstance(one, str)):
            raise HttpFieldError(field, f"{field} must be a non-empty string or a non-empty list of token ids, and "
                                        "a batch's prompts all of one kind.")
        if isinstance(one, list) and any(t < 0 for t in one):
            raise HttpFieldError(field, f"{field} holds a negative token id.")
        if isinstance(one, str):
            try:
                one.encode("utf-8")
            except UnicodeEncodeError:
                raise HttpFieldError(field, f"{field} is not valid Unicode text (a lone surrogate).") from None
        out.append(Prompt(one, field, serving.request_id(f"cmpl-{base_id}-{i}")))
    return tuple(out)


def sampling_fields(data: dict) -> dict:
    """The sampling fields given (null: the default), each of its JSON kind."""
    out: dict = {}
    for key, (name, kind) in SAMPLING.items():
        value = data.get(key)
        if value is None:
            continue
        ok = {"int": is_int(value), "number": (is_int(value) or isinstance(value, float)) and math.isfinite(value),
              "bool": isinstance(value, bool),
              "strs": isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
              "ints": isinstance(value, list) and all(is_int(v) for v in value)}[kind]
        if not ok:
            raise HttpFieldError(key, f"{key} must be " + {"int": "an integer", "number": "a number",
                                                            "bool": "true or false",
                                                            "strs": "a string or a list of strings",
                                                            "ints": "a list of token ids"}[kind] + ".")
        out[name] = [value] if kind == "strs" and isinstance(value, str) else value
    if out.get("bad_words") == []:
        del out["bad_words"]  # vLLM's default
    return out


def logit_bias_field(value: Any) -> Optional[dict]:
    """vLLM's reading (SamplingParams.from_optional): keys token-id strings, values clamped to [-100, 100]."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise HttpFieldError("logit_bias", f"logit_bias must be an object of {{token id: bias}}, not {kind_of(value)}.")
    bad = [k for k in value if not k.lstrip("-").isdigit()]
    if bad:
        raise HttpFieldError("logit_bias", "logit_bias contains key(s) that cannot be converted to integer token IDs: "
                                           f"{shown(bad[:8])}")
    for k, v in value.items():
        if not ((is_int(v) or isinstance(v, float)) and math.isfinite(v)):
            raise HttpFieldError("logit_bias", f"logit_bias[{shown(k)}] must be a number.")
    return {int(k): min(100.0, max(-100.0, float(v))) for k, v in value.items()}


def check_stops(limits, params: dict) -> None:
    """The server's stop-list limits (limits.py), as the gRPC services apply them."""
    try:
        limits.check("max_stop_strings", len(params.get("stop", [])), "stop")
        for i, text in enumerate(params.get("stop", [])):
            limits.check("max_stop_string_chars", len(text), f"stop[{i}]")
        limits.check("max_stop_token_ids", len(params.get("stop_token_ids", [])), "stop_token_ids")
    except ValueError as e:
        raise HttpFieldError(str(e).split(" has ", 1)[0], str(e)) from None


def renamed_error(message: str, given: dict) -> HttpFieldError:
    """SamplingParams' refusal (`SamplingParams.top_p=2 is invalid: ...`) under the request's name of the field."""
    prefix = message.split("=", 1)[0]
    name = prefix.removeprefix("SamplingParams.").removeprefix("sampling_params.")  # limits.py says the gRPC name
    key = next((k for k, (n, _) in SAMPLING.items() if n == name and k in given), name)
    return HttpFieldError(key, shown(message.replace(prefix, key, 1), quote=False))


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


__all__ = ["CompletionRequest", "LOCAL_FIELDS", "RELAYED_FIELDS", "unknown_field", "Prompt", "REFUSED", "SAMPLING", "VLLM_MAX_TOKENS", "claims",
           "check_stops", "is_int", "logprob_count", "read_request", "read_stream_options", "renamed_error",
           "refuse_non_neutral", "sampling_fields"]
