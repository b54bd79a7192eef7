"""Each behaviour of smg that moelink works around, as one named function with the smg releases it was seen in.

Every quirk is a `Quirk` constant (what smg does, the first release it was seen in, and the first release not yet
checked) and one function, marked `@works_around(THAT_QUIRK)`, which is what the rest of moelink calls to work
around it. `QUIRKS` lists them all: tests/server/test_gateway_quirks.py unit-tests each function and fails, naming
the quirk, when the installed smg is outside a quirk's range: then re-check whether the newer smg still behaves so,
and either widen the range (`before`) or drop the workaround.

The machinery behind some workarounds is larger than a function and lives beside this module (the HTTP front,
http_front.py; the hang-up registry, hangups.py; the request-field rewrite, openai_fields.py; vLLM's routes,
vllm_routes.py): the function here is the one place that decides what smg needs.

Nothing here imports another module of the package (they import this one), so any of them may call a quirk.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Optional, TypeVar

from ...contract.structured_output_params import StructuredOutputParams, choice_ebnf


def _release(version: str) -> tuple[int, ...]:
    """"1.13.0" -> (1, 13, 0); a pre-release or local suffix is ignored ("1.14.0rc1" -> (1, 14, 0))."""
    parts = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() != len(piece):
            break
    return tuple(parts)


@dataclass(frozen=True)
class Quirk:
    """A behaviour of smg: seen from release `since` on, and checked up to (not including) release `before`."""

    behaviour: str
    since: str
    before: str

    def holds_for(self, version: str) -> bool:
        """Whether smg `version` is inside the range this quirk was checked for."""
        return _release(self.since) <= _release(version) < _release(self.before)


# The releases each quirk was seen in. smg 1.13.0 is the one moelink has been run and tested with.
SEEN_1_13 = ("1.13", "1.14")

NO_CANCEL_ON_HANGUP = Quirk(
    "smg does not cancel its gRPC call when its HTTP client hangs up before the answer starts, nor during a "
    "non-streamed answer: the request runs to its end (issue 41 medium 5)", *SEEN_1_13)
PARALLEL_TOOL_CALLS_DROPPED = Quirk(
    "smg does not add `maxItems: 1` to its array of required tool calls when the request says "
    "`parallel_tool_calls: false` (its later sources do): the model writes calls until max_tokens cuts one "
    "(issue 54 item 5)", *SEEN_1_13)
STRUCTURED_OUTPUTS_DROPPED = Quirk(
    "smg drops vLLM's structured-output fields (structured_outputs, guided_choice/regex/grammar/json) without a "
    "word; it builds the worker's constraint from response_format, completions' json_schema, regex and ebnf only",
    *SEEN_1_13)
COMPLETIONS_LOGPROBS_DROPPED = Quirk(
    "smg answers /v1/completions without the logprobs the request asked for (chat keeps them)", *SEEN_1_13)
LOGIT_BIAS_DROPPED = Quirk("smg drops `logit_bias` before it calls the worker", *SEEN_1_13)
REASONING_CONTENT = Quirk(
    "smg names a chat answer's reasoning `reasoning_content` (message and stream deltas); vLLM 0.32 names it "
    "`reasoning`", *SEEN_1_13)
FIELDS_DROPPED = Quirk(
    "smg drops vLLM's extra request fields before it calls the worker (bad_words, allowed_token_ids, min_tokens, "
    "truncate_prompt_tokens, include_stop_str_in_output, return_token_ids, spaces_between_special_tokens; on a "
    "chat add_generation_prompt false and echo): the answer is as if they were not sent", *SEEN_1_13)
PROMPT_LOGPROBS_DROPPED = Quirk(
    "smg drops vLLM's `prompt_logprobs` before it calls the worker and answers without them", *SEEN_1_13)
MODELS_WITHOUT_KEY = Quirk(
    "smg asks the API key of its generation routes only: `GET /v1/models` is answered to anyone", *SEEN_1_13)
OPEN_CONTROL_PLANE = Quirk(
    "smg serves its control plane (POST /workers, DELETE /workers/ID, /flush_cache, ...) on the OpenAI port, "
    "open to every client unless it is given control-plane keys", *SEEN_1_13)
ABORTS_AT_START = Quirk(
    "smg now and then aborts (SIGABRT) during its first start on a loaded machine", *SEEN_1_13)
STREAMED_ABORT_AS_STOP = Quirk(
    "smg turns a streamed completion's finish_reason it does not know (\"abort\") into \"stop\": a cut answer reads "
    "as a finished one", *SEEN_1_13)
PLAINTEXT_WORKERS = Quirk(
    "smg dials its gRPC workers in plaintext and sends them no credentials (no API key, no TLS)", *SEEN_1_13)
SILENT_PREFILL_LEG = Quirk(
    "smg's PD mode fails a prefill leg that is silent for 3 s with 504 \"Prefill worker silent\" (issue 54)",
    *SEEN_1_13)
TEMPLATE_LOADER = Quirk(
    "smg reads a --chat-template file that is not .json as its text stripped, each literal backslash-n read as a "
    "newline", *SEEN_1_13)
LEGACY_PARSER_NAMES = Quirk(
    "smg's default (legacy) tool-call and reasoning parsers spell some of vLLM's formats otherwise (hermes is "
    "qwen, kimi_k2 is kimik2 / kimi, ...), and it reads gpt-oss in its Harmony pipeline with no parser flag",
    *SEEN_1_13)
MODELS_BEFORE_TOKENIZER = Quirk(
    "smg lists the model on /v1/models before it has registered the model's tokenizer: for a moment after, its "
    "generation routes answer 503 `tokenizer_not_ready` (seen on a loaded machine right after the server said the "
    "OpenAI API was on; its /v1/tokenize answered already); the supervisor waits for the tokenizer, and the front "
    "sends a request answered so again (http_front.NOT_READY_RETRY_S)", *SEEN_1_13)

# Each quirk's function name -> its Quirk (filled by @works_around).
QUIRKS: dict[str, Quirk] = {}

F = TypeVar("F", bound=Callable[..., Any])


def works_around(quirk: Quirk) -> Callable[[F], F]:
    """Marks a function as the workaround of `quirk` (listed in QUIRKS under the function's name)."""
    def mark(fn: F) -> F:
        QUIRKS[fn.__name__] = quirk
        return fn
    return mark


def installed_smg() -> Optional[str]:
    """The version of the smg installed beside moelink, or None."""
    try:
        return metadata.version("smg")
    except metadata.PackageNotFoundError:
        return None


@works_around(NO_CANCEL_ON_HANGUP)
def relay_request_id_args(relay_header: str) -> list[str]:
    """smg 1.13: smg's arguments that make the front's relay id (`relay_header`, hangups.py) the gRPC request id,
    and only it, so that the server can end the request of an HTTP client that hung up, which smg does not do."""
    return ["--request-id-headers", relay_header]


@works_around(PARALLEL_TOOL_CALLS_DROPPED)
def close_required_calls_after_one(schema: Any) -> Optional[dict]:
    """smg 1.13: `schema` with `maxItems: 1` (what smg's later sources send for `parallel_tool_calls: false`) when it
    is smg's array of required calls without a `maxItems`; None when it is not that array or has one already."""
    if not is_required_calls_schema(schema) or "maxItems" in schema:
        return None
    return {**schema, "maxItems": 1}


def is_required_calls_schema(schema: Any) -> bool:
    """Whether `schema` is smg's array of required calls: `{"type": "array", "minItems": 1, "items": {"type":
    "object", "anyOf": [{"properties": {"name": {"type": "string", "enum": [NAME]}, "parameters": ...},
    "required": ["name", "parameters"]}, ...]}}` (with `$defs` when the tools have some)."""
    if not isinstance(schema, dict) or schema.get("type") != "array" or schema.get("minItems") != 1:
        return False
    if set(schema) - {"type", "minItems", "maxItems", "items", "$defs"}:
        return False
    items = schema.get("items")
    if not isinstance(items, dict) or items.get("type") != "object" or set(items) != {"type", "anyOf"}:
        return False
    tools = items["anyOf"]
    if not isinstance(tools, list) or not tools:
        return False
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("required") != ["name", "parameters"]:
            return False
        props = tool.get("properties")
        if not isinstance(props, dict) or set(props) != {"name", "parameters"}:
            return False
        name = props["name"]
        if not isinstance(name, dict) or name.get("type") != "string" or not isinstance(name.get("enum"), list) \
                or len(name["enum"]) != 1:
            return False
    return True


@works_around(STRUCTURED_OUTPUTS_DROPPED)
def carried_constraint(chat: bool, kind: str, value: Any, params: StructuredOutputParams) -> dict:
    """smg 1.13: the request field smg does carry for vLLM's structured-output constraint `kind` ("choice", "regex",
    "grammar", "json", "json_object") of `value` (checked as `params`), on a chat (`chat`) or completions request:
    `ebnf` for a choice or a grammar, `regex`, chat's `response_format`, completions' `json_schema`."""
    if kind == "choice":
        return {"ebnf": choice_ebnf(params.choice)}
    if kind in ("regex", "grammar"):
        return {"regex" if kind == "regex" else "ebnf": value}
    schema = json.loads(params.json) if isinstance(params.json, str) else params.json
    if chat:
        return {"response_format": ({"type": "json_object"} if kind == "json_object" else
                                    {"type": "json_schema", "json_schema": {"name": "structured_outputs",
                                                                            "schema": schema}})}
    return {"json_schema": '{"type": "object"}' if kind == "json_object" else json.dumps(schema)}


@works_around(COMPLETIONS_LOGPROBS_DROPPED)
def completions_logprobs_dropped(completions: bool, body: dict) -> bool:
    """smg 1.13: whether smg would answer this request (`completions`: to /v1/completions) without the logprobs it
    asks for: the front refuses it (HTTP 400 naming the field) rather than let it be answered as if it had not."""
    return completions and body.get("logprobs") is not None


@works_around(REASONING_CONTENT)
def vllm_reasoning_key(block: bytes) -> bytes:
    """smg 1.13: a relayed chat answer's whole lines (a body or stream events) with smg's `"reasoning_content":` key
    renamed vLLM's `"reasoning":`. Byte-wise and safe: inside a JSON string a quote is escaped (`\\"`), so the
    key with its closing quote and colon is found only as a key."""
    if b'"reasoning_content"' not in block:
        return block
    return block.replace(b'"reasoning_content":', b'"reasoning":')


# What smg 1.13 drops of a request relayed to it (compared by the fixtures of tests/server/test_vllm_compat.py):
# field -> its values that ask nothing (absent, null, or vLLM's default).
_DROPPED_NEUTRAL: dict[str, tuple] = {
    "bad_words": (None, []), "allowed_token_ids": (None,), "min_tokens": (None, 0), "truncate_prompt_tokens": (None,),
    "include_stop_str_in_output": (None, False), "return_token_ids": (None, False),
    "spaces_between_special_tokens": (None, True), "add_generation_prompt": (None, True), "echo": (None, False)}


@works_around(FIELDS_DROPPED)
def dropped_field(body: dict) -> Optional[str]:
    """smg 1.13: the first field of a request relayed to it (structured output, tool calls, a reasoning parser) that
    smg would drop, set to a value that asks something; None when there is none. The front refuses it (HTTP 400
    naming the field) rather than let it be answered as if it had not been sent."""
    return next((k for k, neutral in _DROPPED_NEUTRAL.items() if body.get(k) not in neutral), None)


@works_around(LOGIT_BIAS_DROPPED)
def logit_bias_dropped(body: dict) -> bool:
    """smg 1.13: whether smg would drop this request's `logit_bias` (a non-empty one; null and {} ask nothing):
    the front refuses it (HTTP 400 naming the field) rather than let it be answered as if it had none."""
    bias = body.get("logit_bias")
    return bias is not None and bias != {}


@works_around(PROMPT_LOGPROBS_DROPPED)
def prompt_logprobs_dropped(body: dict) -> bool:
    """smg 1.13: whether smg would answer this request without the prompt logprobs it asks for (vLLM's extra field):
    the front refuses it (HTTP 400 naming the field) rather than let it be answered as if it had not."""
    return body.get("prompt_logprobs") is not None


@works_around(MODELS_WITHOUT_KEY)
def needs_key(path: str) -> bool:
    """smg 1.13 (it answers /v1/models to anyone): whether a public path asks the API key at the front: everything
    under /v1 (vLLM's rule: a path that starts with /v1, /v1beta included), not the probes."""
    return path.startswith("/v1")


@works_around(OPEN_CONTROL_PLANE)
def control_plane_key(key_id: str, admin_key: str) -> str:
    """smg 1.13: the value of smg's `--control-plane-api-keys` that gives the control plane (open to every client
    otherwise) one admin key, `admin_key`, under `key_id`; the front never relays those routes either."""
    return f"{key_id}:moelink:admin:{admin_key}"


@works_around(ABORTS_AT_START)
def start_crashed(returncode: Optional[int], port_free: bool) -> bool:
    """smg 1.13: whether a first start that failed is worth another try: smg died by a signal (`returncode` < 0)
    and its HTTP port is free (no other server took it). An exit with a status is a refusal: not tried again."""
    return returncode is not None and returncode < 0 and port_free


@works_around(MODELS_BEFORE_TOKENIZER)
def tokenizer_ready(status: int, body: bytes) -> bool:
    """smg 1.13: whether smg's answer to `POST /v1/tokenize` (asked once /v1/models lists the model) says the model's
    tokenizer is registered, so the gateway may be reported ready: anything but a 503 naming `tokenizer_not_ready`
    (a release without the route answers 404: nothing to wait for)."""
    return not (status == 503 and b"tokenizer_not_ready" in body)


@works_around(STREAMED_ABORT_AS_STOP)
def streamed_abort_as_error(stream: bool, draining: bool) -> bool:
    """smg 1.13: whether a request the server's shutdown cut short (finish_reason "abort") must end with an error
    status rather than its last message: streamed, smg would turn "abort" into "stop" and the HTTP client would read
    a truncated answer as finished. (An Abort RPC's request still ends with "abort"; unstreamed, smg passes it on.)"""
    return stream and draining


@works_around(PLAINTEXT_WORKERS)
def needs_keyless_listener(api_key: Optional[str], tls: Any) -> bool:
    """smg 1.13: whether a managed gateway needs the server's keyless plaintext listener on loopback: the main port
    asks an API key or speaks TLS, and smg could not even probe the worker there."""
    return bool(api_key or tls)


@works_around(SILENT_PREFILL_LEG)
def prefill_leg_without_grammar(params: Any, producer: bool) -> Any:
    """smg 1.13: the prefill leg of a handoff (`producer`: a prefill server; the request hands its KV off and samples
    one token, as a router's PD mode sends it) without its structured-output constraint: that one token is not the
    answer (the decode server samples every output token under the grammar), and compiling a grammar for it could
    outlast smg's 3 s wait for the prefill leg's first answer (a cold or large schema takes longer)."""
    kv = params.kv_transfer_params
    if (producer and kv is not None and kv.do_remote_decode and params.max_tokens == 1
            and params.structured_outputs is not None):
        return dataclasses.replace(params, structured_outputs=None)
    return params


@works_around(TEMPLATE_LOADER)
def template_from_text(text: str) -> str:
    """smg 1.13: the chat template smg takes from a --chat-template file that is not .json: its text stripped, each
    literal backslash-n read as a newline (the server's own renderings must agree with smg's)."""
    return text.strip().replace("\\n", "\n")


# vLLM's parser names where smg's default "legacy" parsers spell the same format otherwise; smg's own names pass
# through. None: gpt-oss, which smg reads in its built-in Harmony pipeline (it picks a GptOssForCausalLM worker by
# its architecture) with no parser flag: smg has none for harmony, and refuses `openai`.
VLLM_TOOL_CALL_PARSERS = {"openai": None, "hermes": "qwen", "kimi_k2": "kimik2", "glm45": "glm45_moe",
                          "deepseek_v3": "deepseek", "deepseek_v31": "deepseek31", "qwen3_coder": "qwen_coder",
                          "qwen3_xml": "qwen_xml", "llama3_json": "llama"}
VLLM_REASONING_PARSERS = {"openai_gptoss": None, "kimi_k2": "kimi", "minimax_m2": "minimax",
                          "minimax_m2_append_think": "minimax"}


@works_around(LEGACY_PARSER_NAMES)
def smg_parser_name(kind: str, name: Optional[str]) -> Optional[str]:
    """smg 1.13: the name smg takes for a `kind` ("tool_call" / "reasoning") parser given as `name` (vLLM's or
    smg's own); None hands smg no parser flag (gpt-oss, or none given)."""
    table = VLLM_TOOL_CALL_PARSERS if kind == "tool_call" else VLLM_REASONING_PARSERS
    return table.get(name, name) if name is not None else None

