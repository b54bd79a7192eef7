"""vLLM's structured-output fields of an OpenAI request, which the smg gateway (1.13) drops without a word
before it calls a worker (it builds the worker's constraint from `response_format`, completions'
`json_schema`, and SGLang's `regex` / `ebnf` only): `structured_outputs` (`choice`, `regex`, `grammar`, `json`,
`json_object`, as vLLM's OpenAI server takes them) and the older `guided_choice`, `guided_regex`,
`guided_grammar`, `guided_json`.

`rewrite` turns them into the fields smg does carry, so the managed gateway's front (http_front.py) hands smg
a request it enforces as vLLM would; one it cannot carry, or a value the engine would refuse, is an
`HttpFieldError` (HTTP 400 naming the field). A constraint is never dropped in silence.

Completions' `logprobs` too: smg (1.13) answers /v1/completions without them (chat keeps them), so a
completions request relayed to smg that asks for them is HTTP 400 naming the field, never answered as if it had
not. `moelink serve`'s front answers /v1/completions itself from the engine (completions_route.py: logprobs, echo,
prompt logprobs, token-id prompts) and relays only a request with a field smg alone carries (a structured-output
field): these refusals hold for those, and for every request through a front before a hand-started gateway.

`prompt_logprobs` too: smg drops it and answers without them, so on a relayed request it is HTTP 400 naming the field
(the front's /v1/completions, the gRPC VllmEngine service and the Python API return them).

`logit_bias` too: smg drops it, so a relayed request that sets a bias is HTTP 400 naming the field rather than
answered as if it had none (the front's own /v1/completions, the gRPC VllmEngine service and the Python API apply it).
"""
from __future__ import annotations

from typing import Optional

from ...contract.json_depth import MAX_JSON_DEPTH, deep_path, text_depth, too_deep
from ...contract.safe_text import shown
from ...contract.structured_output_params import PREFIX, StructuredOutputParams
from .quirks import (carried_constraint, completions_logprobs_dropped, dropped_field, logit_bias_dropped,
                     prompt_logprobs_dropped)

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
RESPONSES_PATH = "/v1/responses"  # OpenAI's Responses API, as smg serves it
MESSAGES_PATH = "/v1/messages"  # Anthropic's Messages API, as smg serves it
# The generation routes whose `model` may name a LoRA adapter (lora_routes.py): every one smg answers by generating
# on the worker that serves the model. vLLM's structured-output fields are read on the first two only (rewrite).
ADAPTER_PATHS = (CHAT_PATH, COMPLETIONS_PATH, RESPONSES_PATH, MESSAGES_PATH)
GUIDED = {"guided_choice": "choice", "guided_regex": "regex", "guided_grammar": "grammar", "guided_json": "json"}
KINDS = ("choice", "regex", "grammar", "json", "json_object")
# The fields smg forwards as the worker's constraint (a second constraint beside one of them is ambiguous).
SMG_CONSTRAINTS = ("regex", "ebnf", "json_schema", "response_format")


class HttpFieldError(ValueError):
    """A request field the gateway cannot pass on: `field` names it (the OpenAI error's `param`); `status` the HTTP
    status it is answered with."""

    status = 400

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def refuse_too_deep(body: bytes) -> None:
    """Raise HttpFieldError, naming the top-level field that nests deepest, when the JSON text `body` nests past
    MAX_JSON_DEPTH. Measured on the text, before json.loads (which recurses per level: a 100,000-deep body closed
    the connection without an answer, RecursionError); smg refuses past the same depth itself."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return  # it cannot nest deeper than it opens: a usual body is let through by two byte counts
    depth = text_depth(body)
    if depth > MAX_JSON_DEPTH:
        where = deep_path(body.decode("utf-8", "replace")) or "the request body"
        raise HttpFieldError(where.split(".", 1)[0].split("[", 1)[0], too_deep(where, depth))


def rewrite(path: str, body: dict) -> Optional[dict]:
    """The body to send smg in place of `body` (a chat or completions request), or None when it carries none of
    vLLM's structured-output fields. Raises HttpFieldError."""
    if completions_logprobs_dropped(path == COMPLETIONS_PATH, body):
        raise HttpFieldError("logprobs", f"logprobs={shown(body['logprobs'])} is not supported on /v1/completions "
                                         "here: the smg gateway (1.13) answers completions without them; ask "
                                         "/v1/chat/completions with logprobs: true and top_logprobs, or the gRPC "
                                         "services (moelink.v1, VllmEngine), which return them.")
    if prompt_logprobs_dropped(body):
        raise HttpFieldError("prompt_logprobs", f"prompt_logprobs={shown(body['prompt_logprobs'])} is not supported "
                                                "over HTTP here: the smg gateway (1.13) answers without them; ask the "
                                                "gRPC VllmEngine service (sampling_params.prompt_logprobs) or the "
                                                "Python API, which return them.")
    if logit_bias_dropped(body):
        raise HttpFieldError("logit_bias", f"logit_bias={shown(body['logit_bias'])} is not supported: the smg "
                                           "gateway (1.13) drops it on this route; leave it out (null or {} is "
                                           "accepted).")
    dropped = dropped_field(body)
    if dropped is not None:
        raise HttpFieldError(dropped, f"{dropped}={shown(body[dropped])} is not supported on a request the smg gateway "
                                      "(1.13) answers (one with structured output, tool calls, or on a server with a "
                                      "reasoning parser): smg drops it; leave it out there.")
    found = []  # (field as the client named it, kind, value)
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise HttpFieldError("structured_outputs", f"structured_outputs={shown(so)} is invalid: must be an object "
                                                       f"with one of {', '.join(KINDS)}.")
        for key, value in so.items():
            if key not in KINDS:
                raise HttpFieldError(f"structured_outputs.{key}", f"structured_outputs.{key} is not supported: "
                                     f"moelink takes {', '.join(KINDS)} (one of them).")
            if value is not None and value is not False:
                found.append((f"structured_outputs.{key}", key, value))
    found += [(name, kind, body[name]) for name, kind in GUIDED.items() if body.get(name) is not None]
    if not found:
        return None
    also = [name for name, _, _ in found[1:]] + [f for f in SMG_CONSTRAINTS if _constrains(f, body.get(f))]
    name, kind, value = found[0]
    if also:
        raise HttpFieldError(name, f"{name} and {also[0]} are both set: a request takes one output constraint.")
    params = _params(name, kind, value)
    out = {k: v for k, v in body.items() if k != "structured_outputs" and k not in GUIDED}
    out.update(carried_constraint(path == CHAT_PATH, kind, value, params))
    return out


def _params(name: str, kind: str, value) -> StructuredOutputParams:
    """The value checked as the engine checks it; its messages say `name` where the engine says its field."""
    try:
        return StructuredOutputParams(**{kind: value})
    except (TypeError, ValueError) as e:
        raise HttpFieldError(name, str(e).replace(f"{PREFIX}{kind}", name)) from None


def _constrains(field: str, value) -> bool:
    if field == "response_format":
        return isinstance(value, dict) and value.get("type") not in (None, "text")
    return value is not None
