"""Issue 56 item 5: each smg behaviour moelink works around is one named function in
engine/server/gateway/quirks.py with the smg releases it was seen in. These tests need no smg process: each
function is unit-tested, and the installed smg must be inside every quirk's range. When smg is upgraded past a
range, the range test fails naming the quirk: re-check (the tests that drive a real smg through the behaviour are
named in WHERE_DRIVEN) whether the newer smg still needs it, then widen the quirk's `before` or drop the workaround.
"""
from __future__ import annotations

import json

import pytest

from moelink.engine.contract.kv_transfer_params import KVTransferParams
from moelink.engine.contract.structured_output_params import StructuredOutputParams, choice_ebnf
from moelink.engine.server.gateway import quirks
from moelink.engine.server.gateway.quirks import QUIRKS, Quirk

# The tests that drive a real smg (or the front before it) through each quirk's behaviour.
WHERE_DRIVEN = {
    "relay_request_id_args": "tests/server/test_hangups.py, tests/server/test_http_hangup_compiles.py",
    "close_required_calls_after_one": "tests/server/test_one_required_call.py, tests/server/test_tool_calls.py",
    "carried_constraint": "tests/server/test_http_front.py, tests/server/test_smg_gateway.py",
    "completions_logprobs_dropped": "tests/server/test_http_front.py",
    "logit_bias_dropped": "tests/server/test_http_front.py",
    "dropped_field": "tests/server/test_chat_route.py",
    "vllm_reasoning_key": "tests/server/test_tool_calls.py",
    "prompt_logprobs_dropped": "tests/server/test_http_front.py",
    "needs_key": "tests/server/test_http_front.py",
    "control_plane_key": "tests/server/test_gateway_admin.py",
    "start_crashed": "tests/server/test_gateway_supervisor.py",
    "tokenizer_ready": "tests/server/test_http_front.py, tests/server/test_http_hangup_compiles.py, "
                       "tests/server/test_gateway_supervisor.py",
    "streamed_abort_as_error": "tests/server/test_drain_http_streams.py",
    "needs_keyless_listener": "tests/server/test_gateway_auth.py",
    "prefill_leg_without_grammar": "tests/server/test_pd_serving.py",
    "template_from_text": "tests/engine/test_chat_template_flag.py",
    "smg_parser_name": "tests/engine/test_smg_parser_names.py",
}


def test_every_quirk_is_listed_with_where_it_is_driven():
    assert set(QUIRKS) == set(WHERE_DRIVEN)
    for name, quirk in QUIRKS.items():
        assert callable(getattr(quirks, name)), name
        assert quirk.since in (getattr(quirks, name).__doc__ or ""), f"{name}'s docstring names no smg version"


@pytest.mark.parametrize("name", sorted(WHERE_DRIVEN))
def test_installed_smg_is_inside_each_quirks_range(name):
    version = quirks.installed_smg()
    if version is None:
        pytest.skip("smg is not installed")
    quirk = QUIRKS[name]
    assert quirk.holds_for(version), (
        f"smg {version} no longer in the range of quirk {name} (smg {quirk.since} to before {quirk.before}: "
        f"{quirk.behaviour}): re-check whether it is still needed ({WHERE_DRIVEN[name]} drive it)")


def test_quirk_ranges():
    q = Quirk("x", "1.13", "1.14")
    assert q.holds_for("1.13.0") and q.holds_for("1.13.7") and q.holds_for("1.13.0.post1")
    assert not q.holds_for("1.14.0") and not q.holds_for("1.14.0rc1") and not q.holds_for("1.12.9")
    assert not q.holds_for("2.0")


def test_relay_request_id_args():
    assert quirks.relay_request_id_args("x-moelink-relay-id") == ["--request-id-headers", "x-moelink-relay-id"]


def _required_calls(**extra):
    tool = {"properties": {"name": {"type": "string", "enum": ["f"]}, "parameters": {"type": "object"}},
            "required": ["name", "parameters"]}
    return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [tool]}, **extra}


def test_close_required_calls_after_one():
    assert quirks.close_required_calls_after_one(_required_calls()) == _required_calls(maxItems=1)
    assert quirks.close_required_calls_after_one(_required_calls(maxItems=3)) is None  # has one: left as is
    assert quirks.close_required_calls_after_one({"type": "array", "minItems": 1}) is None  # not smg's array
    assert quirks.close_required_calls_after_one("not a schema") is None


def test_carried_constraint():
    choice = StructuredOutputParams(choice=["a", "b"])
    assert quirks.carried_constraint(True, "choice", ["a", "b"], choice) == {"ebnf": choice_ebnf(["a", "b"])}
    assert quirks.carried_constraint(False, "regex", "a+", StructuredOutputParams(regex="a+")) == {"regex": "a+"}
    grammar = 'root ::= "x"'
    assert quirks.carried_constraint(True, "grammar", grammar, StructuredOutputParams(grammar=grammar)) == \
        {"ebnf": grammar}
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    params = StructuredOutputParams(json=json.dumps(schema))
    assert quirks.carried_constraint(True, "json", schema, params) == {"response_format": {
        "type": "json_schema", "json_schema": {"name": "structured_outputs", "schema": schema}}}
    assert json.loads(quirks.carried_constraint(False, "json", schema, params)["json_schema"]) == schema
    obj = StructuredOutputParams(json_object=True)
    assert quirks.carried_constraint(True, "json_object", True, obj) == {"response_format": {"type": "json_object"}}
    assert quirks.carried_constraint(False, "json_object", True, obj) == {"json_schema": '{"type": "object"}'}


def test_dropped_request_fields():
    assert quirks.completions_logprobs_dropped(True, {"logprobs": 2})
    assert not quirks.completions_logprobs_dropped(False, {"logprobs": True})  # chat keeps them
    assert not quirks.completions_logprobs_dropped(True, {"logprobs": None})
    assert quirks.logit_bias_dropped({"logit_bias": {"5": 1.0}})
    assert not quirks.logit_bias_dropped({"logit_bias": {}}) and not quirks.logit_bias_dropped({})
    assert quirks.dropped_field({"bad_words": ["x"], "min_tokens": 2}) == "bad_words"
    said = b'data: {"choices":[{"delta":{"reasoning_content":"say \\"reasoning_content\\": x"}}]}\n\n'
    assert quirks.vllm_reasoning_key(said) == \
        b'data: {"choices":[{"delta":{"reasoning":"say \\"reasoning_content\\": x"}}]}\n\n'
    assert quirks.vllm_reasoning_key(b'{"content":"hi"}') == b'{"content":"hi"}'
    assert quirks.dropped_field({"add_generation_prompt": False}) == "add_generation_prompt"
    assert quirks.dropped_field({"bad_words": [], "min_tokens": 0, "echo": False, "add_generation_prompt": True}) is None
    assert quirks.prompt_logprobs_dropped({"prompt_logprobs": 0})
    assert not quirks.prompt_logprobs_dropped({"prompt_logprobs": None}) and not quirks.prompt_logprobs_dropped({})


def test_needs_key():
    assert quirks.needs_key("/v1/models") and quirks.needs_key("/v1beta/interactions")
    assert not quirks.needs_key("/health") and not quirks.needs_key("/tokenize")


def test_control_plane_key():
    assert quirks.control_plane_key("moelink", "K") == "moelink:moelink:admin:K"


def test_tokenizer_ready():
    assert not quirks.tokenizer_ready(503, b'{"error":{"code":"tokenizer_not_ready","message":"retry shortly"}}')
    assert quirks.tokenizer_ready(200, b'{"tokens":[74,75],"count":2}')
    assert quirks.tokenizer_ready(404, b"")  # a release without the route
    assert quirks.tokenizer_ready(503, b'{"error":{"code":"no_workers"}}')  # another 503 is not this quirk


def test_start_crashed():
    assert quirks.start_crashed(-6, True)  # SIGABRT, port free: tried again
    assert not quirks.start_crashed(-6, False)  # another server took the port
    assert not quirks.start_crashed(2, True)  # a refusal (an exit status)
    assert not quirks.start_crashed(None, True)


def test_streamed_abort_as_error():
    assert quirks.streamed_abort_as_error(True, True)
    assert not quirks.streamed_abort_as_error(False, True) and not quirks.streamed_abort_as_error(True, False)


def test_needs_keyless_listener():
    assert quirks.needs_keyless_listener("key", None) and quirks.needs_keyless_listener(None, object())
    assert not quirks.needs_keyless_listener(None, None)


def test_prefill_leg_without_grammar():
    from moelink.engine.contract.sampling_params import SamplingParams

    so = StructuredOutputParams(regex="a+")
    leg = SamplingParams(max_tokens=1, structured_outputs=so,
                         kv_transfer_params=KVTransferParams(do_remote_decode=True))
    assert quirks.prefill_leg_without_grammar(leg, True).structured_outputs is None
    assert quirks.prefill_leg_without_grammar(leg, False) is leg  # a decode server keeps its grammar


def test_template_from_text():
    assert quirks.template_from_text("  {{ a }}\\n{{ b }}\n") == "{{ a }}\n{{ b }}"


def test_smg_parser_name():
    assert quirks.smg_parser_name("tool_call", "hermes") == "qwen"
    assert quirks.smg_parser_name("tool_call", "qwen") == "qwen"  # smg's own names pass through
    assert quirks.smg_parser_name("tool_call", "openai") is None  # gpt-oss: no parser flag
    assert quirks.smg_parser_name("reasoning", "kimi_k2") == "kimi"
    assert quirks.smg_parser_name("reasoning", None) is None
