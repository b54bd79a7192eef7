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
from . import answer_budget
from .json_body import json_flag, kind_of, valid_text
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
# The list fields refused by their length (RequestLimits) before any entry is looked at.
COUNTED = {"stop": "max_stop_strings", "stop_token_ids": "max_stop_token_ids",
           "allowed_token_ids": "max_allowed_token_ids", "bad_words": "max_bad_words"}
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
    limits = serving.limits
    check_request_id(data, limits)
    stream = json_flag(data, "stream")
    echo = json_flag(data, "echo")
    options = data.get("stream_options")
    if options is not None and not stream:
        raise HttpFieldError("stream_options", "Stream options can only be defined when `stream=True`.")
    include_usage, continuous = read_stream_options(options)
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
    fields = sampling_fields(data, limits)
    bias = logit_bias_field(data.get("logit_bias"), limits)
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
    keep = data.get("truncate_prompt_tokens")
    if keep is not None and (not is_int(keep) or keep < 1):
        raise HttpFieldError("truncate_prompt_tokens", "truncate_prompt_tokens must be an integer >= 1 (the last N "
                                                       "prompt tokens are kept).")
    prompts = _prompts(data.get("prompt"), params.n, limits, serving, base_id, keep)
    if not stream:  # what is known before tokenizing (a text prompt counts 1 token); the route checks it again after
        check_answer(limits, [len(p.prompt) if isinstance(p.prompt, list) else 1 for p in prompts], params.n,
                     max(max_tokens, 1), logprobs, prompt_logprobs, echo)
    as_ids = data.get("return_tokens_as_token_ids")
    if as_ids is not None and not isinstance(as_ids, bool):
        raise HttpFieldError("return_tokens_as_token_ids", "return_tokens_as_token_ids must be true, false or null.")
    return CompletionRequest(prompts, params.sample(0), params.n, echo, logprobs, max_tokens == 0, stream,
                             include_usage, continuous, json_flag(data, "return_token_ids"), keep, lora, base_id,
                             as_ids)


def check_answer(limits, prompt_lens: list, n: int, max_tokens: int, logprobs: Optional[int],
                 prompt_logprobs: Optional[int], echo: bool) -> None:
    """A non-streamed answer's estimated size against --max-answer-bytes (answer_budget.py)."""
    est = answer_budget.estimate(prompt_lens, n, max_tokens, answer_budget.COMPLETIONS_LOGPROB, logprobs,
                                 prompt_logprobs, echo)
    answer_budget.check(limits, est, f"{len(prompt_lens)} prompt(s) of {sum(prompt_lens)} tokens x n={n} x "
                                     f"max_tokens={max_tokens}, logprobs={logprobs}, prompt_logprobs={prompt_logprobs}"
                                     f", echo={str(echo).lower()}")


def check_request_id(data: dict, limits) -> None:
    """The body's `request_id` (an answer's id and every log line of the request): a string of at most
    --max-request-id-chars printable characters, valid Unicode; refused before anything runs."""
    rid = data.get("request_id")
    if rid is None:
        return
    if not isinstance(rid, str):
        raise HttpFieldError("request_id", f"request_id must be a string, not {kind_of(rid)}.")
    valid_text(rid, "request_id")
    if len(rid) > limits.max_request_id_chars or not rid.isprintable():
        raise HttpFieldError("request_id", f"request_id must be at most {limits.max_request_id_chars} printable "
                                           f"characters (--max-request-id-chars): it has {len(rid)}"
                                           + ("" if rid.isprintable() else ", some of them control characters")
                                           + ".")


def check_count(limits, name: str, count: int, field: str) -> None:
    """HTTP 400 naming `field` when `count` (a list's length) is over the limit `name` (its flag in the message)."""
    try:
        limits.check(name, count, field)
    except ValueError as e:
        raise HttpFieldError(field, str(e)) from None


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


def _prompts(prompt: Any, n: int, limits, serving, base_id: str, keep: Optional[int] = None
             ) -> tuple[Prompt, ...]:
    """Each prompt of `prompt` (vLLM's four shapes), its request id `cmpl-{base_id}-{i}` as vLLM numbers them. Every
    list is bounded by its length before its entries are looked at: a batch by --max-prompts-per-request and
    prompts x n by --max-batch-sequences, a token-id prompt by max_model_len (after truncate_prompt_tokens, `keep`)."""
    if isinstance(prompt, str):
        if not prompt:
            raise HttpFieldError("prompt", "Either prompt or prompt_embeds must be provided and non-empty.")
        given, batch = [prompt], False
    elif isinstance(prompt, list) and prompt and is_int(prompt[0]):
        given, batch = [prompt], False
    elif isinstance(prompt, list) and prompt:
        given, batch = prompt, True
        check_count(limits, "max_prompts_per_request", len(given), "prompt")
    else:
        raise HttpFieldError("prompt", "prompt must be a non-empty string, a list of strings, a list of token ids or "
                                       f"a list of token-id lists, not {kind_of(prompt)}.")
    most = limits.max_batch_sequences
    if len(given) * n > most:
        raise HttpFieldError("prompt", f"prompt has {len(given)} prompts x n={n} samples = {len(given) * n} "
                                       f"sequences: at most {most} in one request (--max-batch-sequences).")
    max_len = getattr(getattr(serving, "info", None), "max_model_len", None)
    out = []
    for i, one in enumerate(given):
        field = f"prompt[{i}]" if batch else "prompt"
        if isinstance(one, list) and one:
            if keep is not None:
                one = one[-keep:]  # what prepare keeps of it (truncate_prompt_tokens)
            if is_int(max_len) and len(one) >= max_len:
                raise HttpFieldError(field, f"{field} has {len(one)} token ids, too long: max_model_len={max_len} "
                                            f"leaves room for at most {max_len - 1} prompt tokens.")
        ok = (isinstance(one, str) and one) or (isinstance(one, list) and one and set(map(type, one)) == {int})
        if not ok or (batch and isinstance(given[0], str) != isinstance(one, str)):
            raise HttpFieldError(field, f"{field} must be a non-empty string or a non-empty list of token ids, and "
                                        "a batch's prompts all of one kind.")
        if isinstance(one, list) and min(one) < 0:
            raise HttpFieldError(field, f"{field} holds a negative token id.")
        if isinstance(one, str):
            valid_text(one, field)
        try:
            rid = serving.request_id(f"cmpl-{base_id}-{i}")
        except ValueError as e:
            raise HttpFieldError("request_id", shown(str(e), quote=False)) from None
        out.append(Prompt(one, field, rid))
    return tuple(out)


def sampling_fields(data: dict, limits=None) -> dict:
    """The sampling fields given (null: the default), each of its JSON kind; with `limits`, each list field
    (COUNTED) refused by its length before any entry is looked at."""
    out: dict = {}
    for key, (name, kind) in SAMPLING.items():
        value = data.get(key)
        if value is None:
            continue
        if limits is not None and key in COUNTED and isinstance(value, list):
            check_count(limits, COUNTED[key], len(value), key)
        ok = {"int": is_int(value), "number": (is_int(value) or isinstance(value, float)) and math.isfinite(value),
              "bool": isinstance(value, bool),
              "strs": isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
              "ints": isinstance(value, list) and (not value or set(map(type, value)) == {int})}[kind]
        if not ok:
            raise HttpFieldError(key, f"{key} must be " + {"int": "an integer", "number": "a number",
                                                            "bool": "true or false",
                                                            "strs": "a string or a list of strings",
                                                            "ints": "a list of token ids"}[kind] + ".")
        out[name] = [value] if kind == "strs" and isinstance(value, str) else value
    if out.get("bad_words") == []:
        del out["bad_words"]  # vLLM's default
    return out


def logit_bias_field(value: Any, limits=None) -> Optional[dict]:
    """vLLM's reading (SamplingParams.from_optional): keys token-id strings, values clamped to [-100, 100]; with
    `limits`, at most --max-logit-bias keys, counted first."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise HttpFieldError("logit_bias", f"logit_bias must be an object of {{token id: bias}}, not {kind_of(value)}.")
    if limits is not None:
        check_count(limits, "max_logit_bias", len(value), "logit_bias")
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
        limits.check("max_bad_words", len(params.get("bad_words") or []), "bad_words")
        for i, word in enumerate(params.get("bad_words") or []):
            limits.check("max_bad_word_chars", len(word), f"bad_words[{i}]")
    except ValueError as e:
        raise HttpFieldError(str(e).split(" has ", 1)[0], str(e)) from None
    for name in ("stop", "bad_words"):  # echoed in answers and logs
        for i, text in enumerate(params.get(name) or []):
            if isinstance(text, str):
                valid_text(text, f"{name}[{i}]")


def renamed_error(message: str, given: dict) -> HttpFieldError:
    """SamplingParams' refusal (`SamplingParams.top_p=2 is invalid: ...`) under the request's name of the field."""
    prefix = message.split("=", 1)[0]
    name = prefix.removeprefix("SamplingParams.").removeprefix("sampling_params.")  # limits.py says the gRPC name
    key = next((k for k, (n, _) in SAMPLING.items() if n == name and k in given), name)
    return HttpFieldError(key, shown(message.replace(prefix, key, 1), quote=False))


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


__all__ = ["COUNTED", "CompletionRequest", "LOCAL_FIELDS", "RELAYED_FIELDS", "unknown_field", "Prompt", "REFUSED",
           "SAMPLING", "VLLM_MAX_TOKENS", "check_answer", "check_count", "check_request_id", "claims", "check_stops",
           "is_int", "logprob_count", "read_request", "read_stream_options", "renamed_error", "refuse_non_neutral",
           "sampling_fields"]
