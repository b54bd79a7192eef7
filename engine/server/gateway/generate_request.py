"""The body of SGLang's `POST /generate` read into moelink's requests (generate_route.py answers them;
docs/rl.md#sglangs-generate-over-http).

SGLang's shapes: one prompt (`text` a string, `input_ids` a list of ids) or a batch (`text` a list of strings,
`input_ids` a list of lists); `sampling_params` one object for every prompt or a list of one per prompt, all with the
same `n` (SGLang refuses different ones); `rid` one string (a batch's prompts then `{rid}_{i}`, SGLang's) or one per
prompt; `lora_path` one name or one per prompt. `return_logprob`, `logprob_start_len`, `top_logprobs_num` and `stream`
are one value for the whole request here (SGLang takes per-prompt lists of the first three too: refused, naming the
field). Every refusal is an HttpFieldError naming the field, its index where it is a list's entry
(`sampling_params[1].top_k`, `input_ids[0]`).

The answer's shape follows SGLang's `is_single`: one object for one prompt with n = 1; otherwise a list of
prompts x n results, prompt by prompt, each prompt's n samples together (SGLang's tokenizer manager sends prompt i's
samples one after another and answers in that order).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from ...contract.safe_text import shown
from ...contract.sampling_params import SamplingParams
from . import answer_budget
from .json_body import json_flag, json_text_object, kind_of, valid_text
from .openai_fields import HttpFieldError

FIELDS = ("text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
          "return_routed_experts", "stream", "rid", "lora_path", "model")
# SGLang fields whose every value but its default asks what a text model without custom logit processors cannot do:
# taken at their default (null; an empty list of images, as AReaL and verl send for a text prompt), refused naming
# the field otherwise. A top-level field sent as null is SGLang's default, as if left out (verl sends `text: null`
# beside `input_ids`).
DEFAULT_ONLY = {"image_data": "images (this server serves a text model: send no images, or an empty list)",
                "token_ids_logprob": "the logprobs of chosen token ids (use top_logprobs_num)",
                "custom_logit_processor": "a custom logit processor (SGLang's --enable-custom-logit-processor)"}
# SGLang's sampling key -> (moelink SamplingParams field, JSON kind).
SAMPLING = {"max_new_tokens": ("max_tokens", "int"), "min_new_tokens": ("min_tokens", "int"),
            "temperature": ("temperature", "number"), "top_p": ("top_p", "number"), "top_k": ("top_k", "int"),
            "min_p": ("min_p", "number"), "repetition_penalty": ("repetition_penalty", "number"),
            "presence_penalty": ("presence_penalty", "number"), "frequency_penalty": ("frequency_penalty", "number"),
            "stop": ("stop", "strs"), "stop_token_ids": ("stop_token_ids", "ints"),
            "ignore_eos": ("ignore_eos", "bool"), "skip_special_tokens": ("skip_special_tokens", "bool"),
            "no_stop_trim": ("include_stop_str_in_output", "bool"), "n": ("n", "int"), "seed": ("seed", "int"),
            "sampling_seed": ("seed", "int"),
            "spaces_between_special_tokens": ("spaces_between_special_tokens", "bool"),
            "custom_params": (None, "object")}
# SGLang's `custom_params` is data for a custom logit processor; with none (moelink runs none, and refuses
# custom_logit_processor) SGLang reads it nowhere, and neither does this server: a JSON object of at most this many
# bytes is taken and read by nothing (slime sends {"return_top_p_token_ids": true} whenever top_p != 1).
MAX_CUSTOM_PARAMS_BYTES = 4096
SGLANG_MAX_NEW_TOKENS = 128  # SGLang's default when sampling_params has none


@dataclass(frozen=True)
class Prompt:
    """One prompt of a /generate request, as one moelink request of `n` samples."""

    prompt: Any  # text or token ids
    field: str  # what errors about it name: "text", "input_ids[1]", ...
    params: SamplingParams
    rid: str
    lora: Optional[str]


@dataclass(frozen=True)
class GenerateRequest:
    prompts: tuple[Prompt, ...]
    n: int  # samples per prompt
    single: bool  # one prompt, n = 1: answered as one object, streamed without an index (SGLang's is_single)
    stream: bool
    logprob_start: Optional[int]  # the first prompt position whose logprob is returned, or None

    def index(self, prompt: int, sample: int) -> int:
        """A result's place in the answer: prompt by prompt, each prompt's samples together."""
        return prompt * self.n + sample


def read_request(body: bytes, serving) -> GenerateRequest:
    """The request body as prompts, each checked against the server's limits (`serving`: served names, --max-n,
    --max-logprobs, stop lists, request ids)."""
    data = json_text_object(body)  # every string valid Unicode (json_body.refuse_lone_surrogates)
    data = {k: v for k, v in data.items() if v is not None}  # null: SGLang's default, as if left out
    for key, why in DEFAULT_ONLY.items():
        if key in data and data[key] != []:
            raise HttpFieldError(key, f"{key} is refused: moelink's /generate takes no {why}.")
        data.pop(key, None)
    for key in data:
        if key not in FIELDS:
            raise HttpFieldError(key, f"{shown(key)} is refused: it is not a field moelink's /generate takes "
                                      f"({', '.join(FIELDS)}).")
    most = serving.limits.max_batch_sequences
    max_len = getattr(getattr(serving, "info", None), "max_model_len", None)
    prompts, field, batch = _prompts(data, most, max_len, serving.limits)
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or model not in
                              set(serving.served_model_names) | set(serving.model_aliases)):
        raise HttpFieldError("model", f"model={shown(repr(model))} is not served here "
                                      f"({', '.join(map(repr, serving.served_model_names))}).")
    for name in ("return_logprob", "logprob_start_len", "top_logprobs_num", "stream"):
        if isinstance(data.get(name), list):
            raise HttpFieldError(name, f"{name} must be one value for every prompt of the request (a list per "
                                       "prompt is not taken).")
    logprob = json_flag(data, "return_logprob")
    start = data.get("logprob_start_len", -1)
    if not _is_int(start) or start < -1:
        raise HttpFieldError("logprob_start_len", "logprob_start_len must be an integer >= -1 (-1: the output "
                                                  "tokens' logprobs only).")
    top = data.get("top_logprobs_num", 0)
    if not _is_int(top) or top < 0:
        raise HttpFieldError("top_logprobs_num", "top_logprobs_num must be an integer >= 0.")
    if (start != -1 or top) and not logprob:
        raise HttpFieldError("return_logprob", "logprob_start_len and top_logprobs_num need return_logprob: true.")
    _check_top(serving.limits, top)
    extra = dict(return_routed_experts=json_flag(data, "return_routed_experts"))
    if logprob:
        extra["logprobs"] = top
        if start != -1:
            extra["prompt_logprobs"] = top
    params, n = _params(data.get("sampling_params"), len(prompts), batch, extra, serving.limits)
    if len(prompts) * n > most:
        raise HttpFieldError(field, _too_many(field, len(prompts), n, most))
    rids = _rids(data.get("rid"), len(prompts), batch, serving)
    loras = _loras(data.get("lora_path"), len(prompts), batch)
    items = tuple(Prompt(p, f"{field}[{i}]" if batch else field, params[i], rids[i], loras[i])
                  for i, p in enumerate(prompts))
    req = GenerateRequest(items, n, not batch and n == 1, json_flag(data, "stream"), None if start == -1 else start)
    if not req.stream:  # what is known before tokenizing (a text prompt counts 1 token); the route checks it again
        check_answer(serving.limits, req, [len(p.prompt) if isinstance(p.prompt, list) else 1 for p in items],
                     routed_bytes_per_token(serving, req))
    return req


def routed_bytes_per_token(serving, req: GenerateRequest) -> int:
    """The bytes `meta_info.routed_experts` takes per position (base64 of int32 ids, top_k per MoE layer) when a
    prompt of `req` asks for them, else 0."""
    if not any(p.params.return_routed_experts for p in req.prompts):
        return 0
    model = serving.info.model
    return (4 * len(model.sparse_layers) * model.top_k * 4 + 2) // 3


def check_answer(limits, req: GenerateRequest, prompt_lens: list, routed_per_token: int = 0) -> None:
    """A non-streamed answer's estimated size against --max-answer-bytes (answer_budget.py): per prompt its n
    samples' max_new_tokens with their logprobs, and its input_token_logprobs once (sample 0's); with
    return_routed_experts, every sample's routed experts over its prompt and output positions
    (`routed_per_token` bytes each: routed_bytes_per_token), which a 48-layer, top-8 model makes 2 KiB a token."""
    output = prompt = 0
    for p, length in zip(req.prompts, prompt_lens):
        start = req.logprob_start or 0
        max_new = p.params.max_tokens or 1
        est = answer_budget.estimate([max(length - start, 0)], req.n, max_new,
                                     answer_budget.GENERATE_LOGPROB, p.params.logprobs,
                                     p.params.logprobs if req.logprob_start is not None else None,
                                     prompt_entries_per_choice=False)
        output, prompt = output + est.output, prompt + est.prompt
        if p.params.return_routed_experts:
            output += req.n * max_new * routed_per_token
            prompt += req.n * length * routed_per_token
    top = req.prompts[0].params.logprobs
    fields = (f"{len(req.prompts)} prompt(s) of {sum(prompt_lens)} tokens x n={req.n}, max_new_tokens "
              f"{max(p.params.max_tokens or 1 for p in req.prompts)}, return_logprob={str(top is not None).lower()}, "
              f"top_logprobs_num={top or 0}, logprob_start_len="
              f"{-1 if req.logprob_start is None else req.logprob_start}"
              + (", return_routed_experts=true" if any(p.params.return_routed_experts for p in req.prompts) else ""))
    answer_budget.check(limits, answer_budget.Estimate(output, prompt), fields,
                        params=("sampling_params.max_new_tokens", "logprob_start_len"))


def _too_many(field: str, prompts: int, n: int, most: int) -> str:
    return (f"{field} has {prompts} prompt{'s' if prompts > 1 else ''} x n={n} samples = {prompts * n} sequences: at "
            f"most {most} in one /generate request (--max-batch-sequences); send the rest in further requests.")


def _check_unicode(text: str, field: str) -> None:
    """JSON may escape a lone surrogate ("\\ud800"), which is no Unicode text: the tokenizer failed on it (an internal
    error); a gRPC string is valid UTF-8 by the protocol."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HttpFieldError(field, f"{field} is not valid Unicode text: it holds a lone surrogate "
                                    f"(\\u{ord(text[e.start]):04x}) at character {e.start}.") from None


def _prompts(data: dict, most: int, max_len: Optional[int] = None, limits=None) -> tuple[list, str, bool]:
    """(the prompts, their field, whether the request is a batch); a batch of more than `most` prompts is refused by
    its length before any entry is looked at (--max-prompts-per-request, --max-batch-sequences), and so is a
    token-id prompt of max_model_len (`max_len`) ids or more."""
    if ("text" in data) == ("input_ids" in data):
        raise HttpFieldError("text", "give the prompt(s): `text` (a string, or a list of strings) or `input_ids` (a "
                                     "list of token ids, or a list of such lists).")
    if "text" in data:
        text = data["text"]
        if isinstance(text, str):
            _check_unicode(text, "text")
            return [text], "text", False
        if not isinstance(text, list) or not text:
            raise HttpFieldError("text", f"text must be a string or a non-empty list of strings, not "
                                         f"{kind_of(text)}.")
        _check_prompt_count(limits, len(text), "text")
        if len(text) > most:
            raise HttpFieldError("text", _too_many("text", len(text), 1, most))
        for i, t in enumerate(text):
            if not isinstance(t, str):
                raise HttpFieldError(f"text[{i}]", f"text[{i}] must be a string, not {kind_of(t)}.")
            _check_unicode(t, f"text[{i}]")
        return text, "text", True
    ids = data["input_ids"]
    if not isinstance(ids, list) or not ids:
        raise HttpFieldError("input_ids", "input_ids must be a non-empty list of token ids, or a list of such lists.")
    if not isinstance(ids[0], list):
        _check_ids_length(ids, "input_ids", max_len)
        if set(map(type, ids)) != {int}:
            raise HttpFieldError("input_ids", "input_ids must be a list of token ids (integers), or a list of such "
                                              "lists.")
        return [ids], "input_ids", False
    _check_prompt_count(limits, len(ids), "input_ids")
    if len(ids) > most:
        raise HttpFieldError("input_ids", _too_many("input_ids", len(ids), 1, most))
    for i, one in enumerate(ids):
        if isinstance(one, list):
            _check_ids_length(one, f"input_ids[{i}]", max_len)
        if not isinstance(one, list) or (one and set(map(type, one)) != {int}):
            raise HttpFieldError(f"input_ids[{i}]", f"input_ids[{i}] must be a list of token ids (integers): a "
                                                    "batch is a list of such lists.")
    return ids, "input_ids", True


def _check_prompt_count(limits, count: int, field: str) -> None:
    if limits is None:
        return
    try:
        limits.check("max_prompts_per_request", count, field)
    except ValueError as e:
        raise HttpFieldError(field, str(e)) from None


def _check_ids_length(ids: list, field: str, max_len: Optional[int]) -> None:
    if _is_int(max_len) and len(ids) >= max_len:
        raise HttpFieldError(field, f"{field} has {len(ids)} token ids, too long: max_model_len={max_len} leaves "
                                    f"room for at most {max_len - 1} prompt tokens.")


def _params(sp: Any, count: int, batch: bool, extra: dict, limits) -> tuple[list[SamplingParams], int]:
    """Each prompt's SamplingParams and the samples per prompt (the same n for all, as SGLang asks)."""
    if isinstance(sp, list):
        if not batch or len(sp) != count:
            raise HttpFieldError("sampling_params", f"sampling_params is a list of {len(sp)}: give one object for "
                                 f"every prompt, or a list of one per prompt ({count} here"
                                 + ("" if batch else ": a single prompt takes one object") + ").")
        given = [(f"sampling_params[{i}]", s) for i, s in enumerate(sp)]
    else:
        given = [("sampling_params", sp)] * count
    out, n = [], None
    for where, one in given:
        fields = _sampling(one, where, limits)
        _check_stops(limits, fields, where)
        try:
            params = SamplingParams(**{**fields, **extra})
        except ValueError as e:
            raise _renamed(str(e), one or {}, where) from None
        if n is not None and params.n != n:
            raise HttpFieldError(f"{where}.n", f"{where}.n={params.n} is invalid: every prompt of a request takes "
                                               f"the same n ({n} in sampling_params[0]).")
        n = params.n
        out.append(params.sample(0))  # one engine request of n = 1; Serving.run makes the n samples (seed + j)
    assert n is not None
    try:
        limits.check_n(n)
    except ValueError as e:
        raise HttpFieldError(f"{given[0][0]}.n", str(e)) from None
    return out, n


def _rids(rid: Any, count: int, batch: bool, serving) -> list[str]:
    """Each prompt's request id: given (one string: a batch's prompts `{rid}_{i}`, SGLang's; or one per prompt),
    or made."""
    if rid is None:
        given = [""] * count
    elif isinstance(rid, str):
        given = [f"{rid}_{i}" for i in range(count)] if batch else [rid]
    elif isinstance(rid, list) and batch and len(rid) == count and all(isinstance(r, str) and r for r in rid):
        given = rid
    else:
        raise HttpFieldError("rid", "rid must be a string" + (f", or a list of {count} non-empty strings (one per "
                                                              "prompt)" if batch else "") + ".")
    if len(set(given) - {""}) != len([g for g in given if g]):
        raise HttpFieldError("rid", "rid names a request twice: every prompt of a batch takes its own id.")
    out = []
    for r in given:
        valid_text(r, "rid")
        if not r.isprintable():
            raise HttpFieldError("rid", "rid must be printable text (it is every log line's request id).")
        try:
            out.append(serving.request_id(r))
        except ValueError as e:
            raise HttpFieldError("rid", shown(str(e), quote=False)) from None
    return out


def _loras(lora: Any, count: int, batch: bool) -> list[Optional[str]]:
    if lora is None or isinstance(lora, str):
        return [lora] * count
    if isinstance(lora, list) and batch and len(lora) == count and all(x is None or isinstance(x, str) for x in lora):
        return list(lora)
    raise HttpFieldError("lora_path", "lora_path must be the name of a served LoRA adapter (a string)"
                         + (f", or a list of {count} such names or nulls (one per prompt)" if batch else "") + ".")


def _check_top(limits, top: int) -> None:
    if top > limits.max_logprobs:
        raise HttpFieldError("top_logprobs_num", f"top_logprobs_num={top} is invalid: at most {limits.max_logprobs} "
                                                 "top logprobs per token (--max-logprobs).")


def _check_stops(limits, params: dict, where: str) -> None:
    """The server's stop-list limits (limits.py), as the gRPC services apply them."""
    stop = params.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    try:
        limits.check("max_stop_strings", len(stop), f"{where}.stop")
        for i, text in enumerate(stop):
            limits.check("max_stop_string_chars", len(text), f"{where}.stop[{i}]")
            valid_text(text, f"{where}.stop[{i}]")
        limits.check("max_stop_token_ids", len(params.get("stop_token_ids", [])), f"{where}.stop_token_ids")
    except ValueError as e:
        raise HttpFieldError(str(e).split(" has ", 1)[0], str(e)) from None


# The list keys refused by their length (RequestLimits) before any entry is looked at.
_COUNTED = {"stop": "max_stop_strings", "stop_token_ids": "max_stop_token_ids"}


def _sampling(sp: Any, where: str, limits=None) -> dict:
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise HttpFieldError(where, f"{where} must be a JSON object, not {kind_of(sp)}.")
    out: dict = {"max_tokens": SGLANG_MAX_NEW_TOKENS}
    for key, value in sp.items():
        if key not in SAMPLING:
            raise HttpFieldError(f"{where}.{key}", f"{where}.{shown(key)} is refused: moelink's /generate takes "
                                                   f"{', '.join(SAMPLING)}.")
        name, kind = SAMPLING[key]
        if value is None:
            continue
        if kind == "object":  # custom_params: read by no logit processor here, as on SGLang without one
            if not isinstance(value, dict) or len(json.dumps(value)) > MAX_CUSTOM_PARAMS_BYTES:
                raise HttpFieldError(f"{where}.{key}", f"{where}.{key} must be a JSON object of at most "
                                                       f"{MAX_CUSTOM_PARAMS_BYTES} bytes (data for a custom logit "
                                                       "processor; this server runs none).")
            continue
        if limits is not None and key in _COUNTED and isinstance(value, list):
            try:
                limits.check(_COUNTED[key], len(value), f"{where}.{key}")
            except ValueError as e:
                raise HttpFieldError(f"{where}.{key}", str(e)) from None
        ok = {"int": _is_int(value), "number": _is_int(value) or isinstance(value, float), "bool": isinstance(
            value, bool), "strs": isinstance(value, str) or (isinstance(value, list) and all(isinstance(
                v, str) for v in value)),
            "ints": isinstance(value, list) and (not value or set(map(type, value)) == {int})}[kind]
        if not ok:
            raise HttpFieldError(f"{where}.{key}", f"{where}.{key} must be "
                                 + {"int": "an integer", "number": "a number", "bool": "true or false",
                                    "strs": "a string or a list of strings", "ints": "a list of token ids"}[kind] + ".")
        out[name] = value
    return out


def _renamed(message: str, given: dict, where: str) -> HttpFieldError:
    """SamplingParams' refusal (`SamplingParams.max_tokens=0 is invalid: ...`) under SGLang's name of the field."""
    name = message.split("=", 1)[0].removeprefix("SamplingParams.")
    key = next((k for k, (n, _) in SAMPLING.items() if n == name and k in given), None)
    if key is None:
        return HttpFieldError(where, f"{where}: {shown(message, quote=False)}")
    value = shown(json.dumps(given[key]), quote=False)
    return HttpFieldError(f"{where}.{key}", f"{where}.{key}={value} is invalid"
                          + shown(message.split(" is invalid", 1)[-1], quote=False))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


__all__ = ["FIELDS", "GenerateRequest", "Prompt", "SAMPLING", "check_answer", "read_request",
           "routed_bytes_per_token"]
