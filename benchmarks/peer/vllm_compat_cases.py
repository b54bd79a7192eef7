"""The fixed requests of the vLLM compatibility suite, the HTTP client that sends them and the offline calls.

Standard library only: the recorder (benchmarks/peer/record_vllm_fixtures.py) runs it in the peer venv's Python
against the real vLLM, and the replay test (tests/server/test_vllm_compat.py) runs the same client and the same
offline calls against moelink, so both answers are read the same way. A case is a dict: `name` (family/what),
`method`, `path`, `body` (JSON, or `raw` bytes for a body that is not JSON), `stream` (read as server-sent events).
Sampled values are compared, so every sampling case is greedy (temperature 0) or seeded.
"""
from __future__ import annotations

import http.client
import json
from typing import Any, Callable, Optional

MODEL = "builtin-model"  # served as written: both servers start on `builtin-model` from the repository root
P1 = "Return the number of items in the list."
P2 = "Create a new"
P3 = "The default value is"
P1_IDS = [344, 264, 597, 303, 1289, 293, 264, 448, 16]  # P1 in the built-in model's tokenizer
P3_IDS = [463, 542, 500, 299]
P4 = "If the argument is"  # completions' prompt: the built-in model writes 8 tokens after it before its EOS
P4_IDS = [578, 264, 473, 299]
EOS, IM_START, IM_END = 0, 1, 2
USER = [{"role": "user", "content": "Return the number of items in the list."}]
# Dropped from every recorded answer: fresh per request on both servers, never compared.
VOLATILE_KEYS = {"created", "system_fingerprint"}
VOLATILE_ID_PREFIXES = ("cmpl-", "chatcmpl-", "modelperm-", "chatcmpl-tool-", "tokenize-")


def cmpl(name: str, **body: Any) -> dict:
    return {"name": f"completions/{name}", "method": "POST", "path": "/v1/completions",
            "body": {"model": MODEL, "prompt": P4, "temperature": 0, "max_tokens": 8, **body},
            "stream": bool(body.get("stream"))}


def chat(name: str, **body: Any) -> dict:
    return {"name": f"chat/{name}", "method": "POST", "path": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": USER, "temperature": 0, "max_tokens": 8, **body},
            "stream": bool(body.get("stream"))}


def route(name: str, method: str, path: str, body: Any = None, raw: Optional[bytes] = None) -> dict:
    case = {"name": f"routes/{name}", "method": method, "path": path, "body": body, "stream": False}
    if raw is not None:
        case["raw"] = raw.decode()
    return case


USAGE = {"include_usage": True}


def completion_cases() -> list[dict]:
    ok = [
        cmpl("text"), cmpl("text_batch", prompt=[P4, P2, P3]), cmpl("token_ids", prompt=P4_IDS),
        cmpl("token_id_batch", prompt=[P4_IDS, P3_IDS]), cmpl("max_tokens_1", max_tokens=1),
        cmpl("max_tokens_default", max_tokens=None), cmpl("max_tokens_omitted_default_sampling", seed=3, max_tokens=6,
                                                          temperature=None),
        cmpl("max_tokens_past_context", max_tokens=2000), cmpl("max_tokens_0_echo", max_tokens=0, echo=True),
        cmpl("max_tokens_0", max_tokens=0),
        cmpl("logprobs_0", logprobs=0), cmpl("logprobs_1", logprobs=1), cmpl("logprobs_5", logprobs=5),
        cmpl("logprobs_batch", prompt=[P4, P3], logprobs=2),
        cmpl("echo", echo=True), cmpl("echo_logprobs_lm_eval", echo=True, logprobs=1, max_tokens=1, prompt=P1_IDS),
        cmpl("echo_logprobs_0_tokens", echo=True, logprobs=1, max_tokens=0, prompt=P1_IDS),
        cmpl("echo_logprobs_text", echo=True, logprobs=2, max_tokens=2),
        cmpl("prompt_logprobs_0", prompt_logprobs=0), cmpl("prompt_logprobs_2", prompt_logprobs=2),
        cmpl("prompt_logprobs_and_logprobs", prompt_logprobs=1, logprobs=1, max_tokens=3),
        cmpl("n_3_greedy_refused", n=3, max_tokens=4), cmpl("n_2_seeded", n=2, temperature=1.0, seed=7, max_tokens=6),
        cmpl("n_100", n=100, temperature=1.0, seed=1, max_tokens=1),
        cmpl("seed_sampling", temperature=1.0, seed=42, max_tokens=10),
        cmpl("seed_top_k_top_p", temperature=0.9, top_k=5, top_p=0.8, seed=11, max_tokens=10),
        cmpl("seed_min_p", temperature=1.2, min_p=0.1, seed=5, max_tokens=10),
        cmpl("stop_string", stop=[" the"], max_tokens=16), cmpl("stop_string_scalar", stop=" of", max_tokens=16),
        cmpl("stop_include", stop=[" the"], include_stop_str_in_output=True, max_tokens=16),
        cmpl("stop_token_ids", stop_token_ids=[264], max_tokens=16),
        cmpl("stop_token_ids_logprobs", stop_token_ids=[264], max_tokens=16, logprobs=1),
        cmpl("ignore_eos", ignore_eos=True, max_tokens=24), cmpl("eos_stop", max_tokens=48),
        cmpl("min_tokens", min_tokens=6, stop_token_ids=[264], max_tokens=10),
        cmpl("truncate_prompt_tokens", truncate_prompt_tokens=3, return_token_ids=True),
        cmpl("bad_words", bad_words=[" the"], max_tokens=12),
        cmpl("allowed_token_ids", allowed_token_ids=[264, 303, 16], max_tokens=6),
        cmpl("logit_bias", logit_bias={"303": 100}, max_tokens=4),
        cmpl("return_token_ids", return_token_ids=True),
        cmpl("penalties", repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5, max_tokens=12),
        cmpl("skip_special_tokens_false", skip_special_tokens=False, ignore_eos=True, max_tokens=12),
        cmpl("spaces_between_special_tokens", spaces_between_special_tokens=False),
        cmpl("user_field", user="someone"), cmpl("model_omitted_prompt_ok", model=None),
        cmpl("stream", stream=True, max_tokens=5),
        cmpl("stream_usage", stream=True, stream_options=USAGE, max_tokens=5),
        cmpl("stream_continuous_usage", stream=True, stream_options={**USAGE, "continuous_usage_stats": True},
             max_tokens=3),
        cmpl("stream_logprobs", stream=True, logprobs=2, max_tokens=4),
        cmpl("stream_echo", stream=True, echo=True, max_tokens=3),
        cmpl("stream_n_2", stream=True, n=2, temperature=1.0, seed=3, max_tokens=3),
        cmpl("stream_stop", stream=True, stop=[" the"], max_tokens=16),
    ]
    return ok + completion_error_cases()


def completion_error_cases() -> list[dict]:
    bad = {"temperature_negative": {"temperature": -1}, "top_p_0": {"top_p": 0}, "top_p_above_1": {"top_p": 1.5},
           "top_k_minus_2": {"top_k": -2}, "min_p_2": {"min_p": 2}, "n_0": {"n": 0},
           "max_tokens_negative": {"max_tokens": -1}, "max_tokens_string": {"max_tokens": "x"},
           "logprobs_25": {"logprobs": 25}, "logprobs_negative": {"logprobs": -2},
           "prompt_logprobs_25": {"prompt_logprobs": 25}, "presence_penalty_3": {"presence_penalty": 3},
           "frequency_penalty_minus_3": {"frequency_penalty": -3}, "repetition_penalty_0": {"repetition_penalty": 0},
           "stop_int": {"stop": 5}, "seed_string": {"seed": "x"}, "prompt_empty_string": {"prompt": ""},
           "prompt_empty_list": {"prompt": []}, "prompt_token_out_of_vocab": {"prompt": [1, 99999]},
           "prompt_missing": {"prompt": None}, "truncate_prompt_tokens_minus_2": {"truncate_prompt_tokens": -2},
           "min_tokens_above_max": {"min_tokens": 9, "max_tokens": 4}, "min_tokens_negative": {"min_tokens": -1},
           "prompt_logprobs_stream": {"stream": True, "prompt_logprobs": 1},
           "suffix": {"suffix": " done"}, "use_beam_search": {"use_beam_search": True},
           "logit_bias_bad_key": {"logit_bias": {"abc": 1}}, "logit_bias_out_of_vocab": {"logit_bias": {"99999": 1}},
           "allowed_token_ids_out_of_vocab": {"allowed_token_ids": [99999]}, "unknown_field": {"temprature": 0.5},
           "unknown_model": {"model": "no-such-model"}, "prompt_too_long": {"prompt": [5] * 1100},
           "temperature_string": {"temperature": "hot"}, "stream_options_without_stream": {"stream_options": USAGE}}
    cases = [cmpl(f"bad_{k}", **v) for k, v in bad.items()]
    cases.append({**route("x", "POST", "/v1/completions", raw=b"{not json"), "name": "completions/bad_json_body"})
    cases.append({**route("x", "POST", "/v1/completions", body=[1, 2]), "name": "completions/bad_body_not_object"})
    return cases


def chat_cases() -> list[dict]:
    system = [{"role": "system", "content": "You list things."}, *USER]
    turns = [*USER, {"role": "assistant", "content": "It counts them."},
             {"role": "user", "content": "Create a new list."}]
    partial = [*USER, {"role": "assistant", "content": "The number of"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Return the number"},
                                          {"type": "text", "text": " of items."}]}]
    ok = [
        chat("basic"), chat("system", messages=system), chat("multi_turn", messages=turns),
        chat("content_parts", messages=parts), chat("max_completion_tokens", max_tokens=None, max_completion_tokens=5),
        chat("max_tokens_default", max_tokens=None, ignore_eos=True),
        chat("default_sampling", temperature=None, seed=3, max_tokens=6),
        chat("max_tokens_past_context", max_tokens=2000), chat("max_tokens_1", max_tokens=1),
        chat("logprobs", logprobs=True), chat("top_logprobs_3", logprobs=True, top_logprobs=3),
        chat("logprobs_stop_token_last", logprobs=True, top_logprobs=1, max_tokens=64),
        chat("logprobs_stop_string_last", logprobs=True, stop=[" the"], max_tokens=16),
        chat("logprobs_ignore_eos", logprobs=True, ignore_eos=True, max_tokens=24),
        chat("n_2_seeded", n=2, temperature=1.0, seed=7, max_tokens=6), chat("n_3_greedy_refused", n=3, max_tokens=3),
        chat("seed_sampling", temperature=1.0, seed=42, max_tokens=10),
        chat("stop", stop=[" the"], max_tokens=16), chat("stop_include", stop=[" the"],
                                                          include_stop_str_in_output=True, max_tokens=16),
        chat("stop_token_ids", stop_token_ids=[264], max_tokens=16),
        chat("ignore_eos", ignore_eos=True, max_tokens=24), chat("eos_stop", max_tokens=64),
        chat("min_tokens", min_tokens=6, stop_token_ids=[264], max_tokens=10),
        chat("truncate_prompt_tokens", truncate_prompt_tokens=5, return_token_ids=True),
        chat("bad_words", bad_words=[" the"], max_tokens=12),
        chat("allowed_token_ids", allowed_token_ids=[264, 303, 16], max_tokens=6),
        chat("logit_bias", logit_bias={"303": 100}, max_tokens=4), chat("return_token_ids", return_token_ids=True),
        chat("prompt_logprobs", prompt_logprobs=1, max_tokens=2),
        chat("add_generation_prompt_false", add_generation_prompt=False),
        chat("continue_final_message", messages=partial, add_generation_prompt=False, continue_final_message=True),
        chat("echo", echo=True, messages=partial, add_generation_prompt=False, continue_final_message=True),
        chat("role_wizard", messages=[{"role": "wizard", "content": "Return the number"}]),
        chat("skip_special_tokens_false", skip_special_tokens=False, ignore_eos=True, max_tokens=12),
        chat("penalties", repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5, max_tokens=12),
        chat("user_field", user="someone"),
        chat("stream", stream=True, max_tokens=5), chat("stream_usage", stream=True, stream_options=USAGE, max_tokens=5),
        chat("stream_logprobs", stream=True, logprobs=True, top_logprobs=2, max_tokens=4),
        chat("stream_n_2", stream=True, n=2, temperature=1.0, seed=3, max_tokens=3),
        chat("stream_eos", stream=True, stream_options=USAGE, max_tokens=64),
        chat("stream_stop", stream=True, stop=[" the"], max_tokens=16),
    ]
    return ok + chat_error_cases()


def chat_error_cases() -> list[dict]:
    bad = {"temperature_negative": {"temperature": -1}, "top_logprobs_25": {"logprobs": True, "top_logprobs": 25},
           "top_logprobs_without_logprobs": {"top_logprobs": 2}, "n_0": {"n": 0}, "messages_empty": {"messages": []},
           "messages_missing": {"messages": None}, "role_missing": {"messages": [{"content": "hi"}]},
           "max_tokens_negative": {"max_tokens": -1}, "unknown_model": {"model": "no-such-model"},
           "unknown_field": {"temprature": 0.5}, "top_p_0": {"top_p": 0}, "min_tokens_above_max":
           {"min_tokens": 9, "max_tokens": 4}, "logit_bias_bad_key": {"logit_bias": {"abc": 1}},
           "stream_options_without_stream": {"stream_options": USAGE},
           "continue_and_add_generation_prompt": {"messages": [*USER, {"role": "assistant", "content": "The"}],
                                                  "continue_final_message": True, "add_generation_prompt": True},
           "prompt_too_long": {"messages": [{"role": "user", "content": " the" * 1100}]}}
    return [chat(f"bad_{k}", **v) for k, v in bad.items()]


def route_cases() -> list[dict]:
    return [
        route("models", "GET", "/v1/models"), route("health", "GET", "/health"), route("version", "GET", "/version"),
        route("ping_get", "GET", "/ping"), route("ping_post", "POST", "/ping"),
        route("tokenize_prompt", "POST", "/tokenize", {"model": MODEL, "prompt": P1}),
        route("tokenize_token_strs", "POST", "/tokenize", {"model": MODEL, "prompt": P3, "return_token_strs": True}),
        route("tokenize_no_special", "POST", "/tokenize", {"model": MODEL, "prompt": P3, "add_special_tokens": False}),
        route("tokenize_messages", "POST", "/tokenize", {"model": MODEL, "messages": USER}),
        route("tokenize_messages_no_generation_prompt", "POST", "/tokenize",
              {"model": MODEL, "messages": USER, "add_generation_prompt": False}),
        route("tokenize_unknown_model", "POST", "/tokenize", {"model": "no-such-model", "prompt": P1}),
        route("detokenize", "POST", "/detokenize", {"model": MODEL, "tokens": P1_IDS}),
        route("detokenize_special", "POST", "/detokenize", {"model": MODEL, "tokens": [IM_START, 264, IM_END, EOS]}),
        route("detokenize_unknown_id", "POST", "/detokenize", {"model": MODEL, "tokens": [264, 99999]}),
        route("detokenize_empty", "POST", "/detokenize", {"model": MODEL, "tokens": []}),
        route("detokenize_negative_id", "POST", "/detokenize", {"model": MODEL, "tokens": [-1]}),
        route("not_found", "GET", "/no/such/route"), route("not_found_v1", "POST", "/v1/no-such", {}),
        route("completions_get_405", "GET", "/v1/completions"),
        route("chat_get_405", "GET", "/v1/chat/completions"), route("models_post_405", "POST", "/v1/models", {}),
        route("health_post_405", "POST", "/health", {}), route("tokenize_get_405", "GET", "/tokenize"),
    ]


def http_cases() -> list[dict]:
    return [*completion_cases(), *chat_cases(), *route_cases()]


# -- the client ---------------------------------------------------------------------------------------------------
def _clean_body(body: Any) -> Any:
    """A case's body as sent: a None value leaves the field out (cases write `max_tokens=None` for "omitted")."""
    if isinstance(body, dict):
        return {k: v for k, v in body.items() if v is not None}
    return body


def send(port: int, case: dict, timeout: float = 120.0) -> dict:
    """One case sent to 127.0.0.1:port: {"status", "content_type", "body"} with the body parsed (JSON, the list of
    server-sent events with "[DONE]" kept as that string, or the text) and volatile ids dropped."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {}
        payload: Optional[bytes] = None
        if "raw" in case:
            payload = case["raw"].encode()
        elif case.get("body") is not None:
            payload = json.dumps(_clean_body(case["body"])).encode()
        if payload is not None:
            headers["Content-Type"] = "application/json"
        conn.request(case["method"], case["path"], body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read().decode("utf-8", errors="replace")
        ctype = (resp.getheader("content-type") or "").split(";")[0].strip()
        return {"status": resp.status, "content_type": ctype, "body": scrub(parse_body(raw, ctype))}
    finally:
        conn.close()


def parse_body(raw: str, ctype: str) -> Any:
    if ctype == "text/event-stream":
        events: list = []
        for line in raw.splitlines():
            if line.startswith("data:"):
                data = line[5:].strip()
                events.append(data if data == "[DONE]" else json.loads(data))
        return events
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def scrub(value: Any) -> Any:
    """Drop what is fresh per request (creation times, fingerprints, generated ids) so fixtures diff cleanly."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE_KEYS and not _volatile_id(k, v)}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def _volatile_id(key: str, value: Any) -> bool:
    return key == "id" and isinstance(value, str) and value.startswith(VOLATILE_ID_PREFIXES)


def metric_families(text: str) -> dict:
    """/metrics reduced to what is compared: each `vllm:` family's type and the label names of its samples."""
    out: dict = {}
    for line in text.splitlines():
        if line.startswith("# TYPE vllm:"):
            _, _, name, kind = line.split(maxsplit=3)
            out.setdefault(name, {"type": kind, "labels": []})["type"] = kind
        elif line.startswith("vllm:"):
            name, _, rest = line.partition("{")
            family = _family(name.split()[0], out)
            labels = sorted(p.split("=", 1)[0] for p in _labels(rest) if not p.startswith("le="))
            entry = out.setdefault(family, {"type": "untyped", "labels": []})
            if labels not in entry["labels"]:
                entry["labels"].append(labels)
    # `_created` series are prometheus_client's creation timestamps (its text format lists them as gauges), not
    # metrics vLLM defines: left out, as PROMETHEUS_DISABLE_CREATED_SERIES would.
    return {k: {"type": v["type"], "labels": sorted(v["labels"])} for k, v in sorted(out.items())
            if not k.endswith("_created")}


def _family(sample: str, known: dict) -> str:
    for suffix in ("_bucket", "_sum", "_count", "_total", "_created"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in known:
            return sample[: -len(suffix)]
    return sample


def _labels(rest: str) -> list[str]:
    inside = rest.rsplit("}", 1)[0] if "}" in rest else ""
    parts, cur, quoted = [], "", False
    for ch in inside:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]


# -- the offline API: the same calls on vLLM's LLM and moelink's ---------------------------------------------------
SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids",
                   "ignore_eos", "logprobs", "prompt_logprobs", "skip_special_tokens", "spaces_between_special_tokens",
                   "include_stop_str_in_output", "bad_words", "allowed_token_ids", "logit_bias",
                   "truncate_prompt_tokens", "detokenize", "extra_args")
GREEDY = {"temperature": 0.0, "max_tokens": 8}
CONVERSATION_2 = [{"role": "user", "content": "Create a new list."}]


def offline(name: str, call: str, **spec: Any) -> dict:
    return {"name": f"offline/{name}", "call": call, **spec}


def offline_cases() -> list[dict]:
    g = GREEDY
    return [
        offline("generate_text", "generate", prompts=P4, params=g),
        offline("generate_batch", "generate", prompts=[P4, P2, P3], params=g),
        offline("generate_token_ids", "generate", prompts={"prompt_token_ids": P4_IDS}, params=g),
        offline("generate_logprobs", "generate", prompts=P4, params={**g, "logprobs": 3}),
        offline("generate_prompt_logprobs", "generate", prompts=P4, params={**g, "prompt_logprobs": 2}),
        offline("generate_n_2_seeded", "generate", prompts=P4,
                params={"n": 2, "temperature": 1.0, "seed": 7, "max_tokens": 6}),
        offline("generate_stop", "generate", prompts=P4, params={**g, "stop": [" the"], "max_tokens": 16}),
        offline("generate_stop_include", "generate", prompts=P4,
                params={**g, "stop": [" the"], "include_stop_str_in_output": True, "max_tokens": 16}),
        offline("generate_min_tokens", "generate", prompts=P4,
                params={**g, "min_tokens": 6, "stop_token_ids": [264], "max_tokens": 10}),
        offline("generate_bad_words", "generate", prompts=P4, params={**g, "bad_words": [" the"], "max_tokens": 12}),
        offline("generate_allowed_token_ids", "generate", prompts=P4,
                params={**g, "allowed_token_ids": [264, 303, 16], "max_tokens": 6}),
        offline("generate_logit_bias", "generate", prompts=P4, params={**g, "logit_bias": {303: 100.0}}),
        offline("generate_max_tokens_past_context", "generate", prompts=P4, params={**g, "max_tokens": 2000}),
        offline("default_sampling_params", "default_params"),
        offline("chat_one", "chat", messages=USER, params=g),
        offline("chat_list", "chat", messages=[USER, CONVERSATION_2], params=g),
        offline("chat_no_generation_prompt", "chat", messages=USER, params=g, kwargs={"add_generation_prompt": False}),
        offline("chat_continue_final_message", "chat", params=g,
                messages=[*USER, {"role": "assistant", "content": "The number of"}],
                kwargs={"add_generation_prompt": False, "continue_final_message": True}),
        offline("sampling_params_defaults", "sampling_params", params={}),
        offline("sampling_params_new_fields", "sampling_params",
                params={"bad_words": ["x"], "logit_bias": {5: 1.0}, "allowed_token_ids": [5, 6],
                        "spaces_between_special_tokens": False, "extra_args": {"k": 1}}),
        offline("sampling_params_bad_temperature", "sampling_params", params={"temperature": -1.0}),
        offline("sampling_params_bad_top_p", "sampling_params", params={"top_p": 0.0}),
        offline("sampling_params_bad_n", "sampling_params", params={"n": 0}),
        offline("sampling_params_bad_max_tokens", "sampling_params", params={"max_tokens": 0}),
        offline("sampling_params_unknown_field", "sampling_params", params={"temprature": 0.5}),
    ]


def run_offline_case(llm: Any, sampling_params: Callable[..., Any], case: dict) -> dict:
    """One offline case on an engine's LLM: the outputs serialized, or the error's builtin class."""
    try:
        call = case["call"]
        if call == "sampling_params":
            return {"params": sampling_dict(sampling_params(**case["params"]))}
        if call == "default_params":
            return {"params": sampling_dict(llm.get_default_sampling_params())}
        params = None if case["params"] is None else sampling_params(**case["params"])
        if call == "generate":
            outs = llm.generate(case["prompts"], params, use_tqdm=False)
        else:
            outs = llm.chat(case["messages"], params, use_tqdm=False, **case.get("kwargs", {}))
        return {"outputs": [request_output(o) for o in outs]}
    except Exception as e:  # the case records which error, as a builtin class (vLLM's are ValueError subclasses)
        return {"error": error_class(e)}


def error_class(e: BaseException) -> str:
    for cls in (TypeError, ValueError, KeyError, RuntimeError):
        if isinstance(e, cls):
            return cls.__name__
    return type(e).__name__


def sampling_dict(sp: Any) -> dict:
    out = {}
    for name in SAMPLING_FIELDS:
        v = getattr(sp, name, "<absent>")
        out[name] = _jsonable(v)
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def public_attrs(obj: Any) -> dict:
    """The object's public attributes, by name (a mapping, so a missing one is named where it is missing)."""
    return {k: None for k in sorted(vars(obj)) if not k.startswith("_")}


def logprob_entries(entries: Any) -> Any:
    """Per position None or [[token id, logprob, rank, decoded token], ...] in the engine's order."""
    if entries is None:
        return None
    return [None if pos is None else [[int(t), float(lp.logprob), lp.rank, lp.decoded_token]
                                      for t, lp in pos.items()] for pos in entries]


def request_output(o: Any) -> dict:
    return {"attrs": public_attrs(o), "prompt": o.prompt, "prompt_token_ids": list(o.prompt_token_ids or []),
            "finished": o.finished, "num_cached_tokens": getattr(o, "num_cached_tokens", "<absent>"),
            "lora_request": _jsonable(getattr(o, "lora_request", "<absent>")),
            "prompt_logprobs": logprob_entries(o.prompt_logprobs),
            "outputs": [completion_output(c) for c in o.outputs]}


def completion_output(c: Any) -> dict:
    return {"attrs": public_attrs(c), "index": c.index, "text": c.text, "token_ids": list(c.token_ids),
            "cumulative_logprob": c.cumulative_logprob, "logprobs": logprob_entries(c.logprobs),
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
