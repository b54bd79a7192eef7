"""Tool calling and reasoning output through `moelink serve --tool-call-parser P --reasoning-parser R` (issue 48):
the managed smg gateway's parsers, with the official `openai` client, on tiny checkpoints dressed as three
families (tests/helpers/family_chat.py: their tokens and chat-template formats). The random model says nothing
useful, so every tool call is forced by constrained decoding: a named `tool_choice` (smg constrains the output to
the function's JSON arguments) and `tool_choice: auto` with the family's own tool-call text forced by a
`guided_regex` (what the family's parser must read back); streamed and not. Reasoning: the family's thinking
text forced the same way, split into `reasoning_content`."""
from __future__ import annotations

import json
import re

import pytest

from moelink.engine.tools.tiny_model import make_tiny_model

from tests.helpers.family_chat import FAMILIES, VOCAB, dress
from tests.helpers.grpc_server import ENGINE_FLAGS, ServerProcess
from tests.helpers.net import free_port
from tests.helpers.smg_gateway import smg_executable

pytestmark = pytest.mark.slow  # a server subprocess and the gateway per family

SERVED = "tiny"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"]}}}]
ARGS = {"city": "Paris"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_server(request, tmp_path_factory):
    openai = pytest.importorskip("openai")
    if smg_executable() is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    fam = FAMILIES[request.param]
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), fam.arch, vocab_size=VOCAB,
                           max_position_embeddings=1024)
    dress(path, fam)
    port = free_port()
    srv = ServerProcess(str(path), ENGINE_FLAGS + ["--max-model-len", "1024", "--served-model-name", SERVED,
                                                   "--http-port", str(port),
                                                   "--tool-call-parser", fam.tool_call_parser,
                                                   "--reasoning-parser", fam.reasoning_parser,
                                                   "--enable-auto-tool-choice"])
    try:
        srv.wait_for_line(r"moelink: OpenAI API on ", 30, "the OpenAI API line")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120, max_retries=0)
        yield fam, client, str(path)
    finally:
        srv.stop()
        srv.close()


def _chat(client, stream: bool, **kw):
    body = dict(model=SERVED, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                temperature=0, max_tokens=200, stream=stream, **kw)
    if not stream:
        out = client.chat.completions.create(**body)
        return out.choices[0].message.tool_calls, out.choices[0].finish_reason, out.choices[0].message
    calls, finish = {}, None
    for chunk in client.chat.completions.create(**body):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish, None


def _name_args(call) -> tuple[str, dict]:
    if isinstance(call, dict):
        return call["name"], json.loads(call["arguments"])
    return call.function.name, json.loads(call.function.arguments)


def test_the_template_renders_the_tools_in_the_familys_format(family_server):
    from moelink.engine.core.tokenizer import Tokenizer

    fam, _, path = family_server
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "bye"}]
    text = Tokenizer.from_dir(path).apply_chat_template(turns, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "get_weather" in text and all(t in text for t in fam.role_tokens if t != "<|observation|>"), text


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_is_forced_and_parsed(family_server, stream):
    fam, client, _ = family_server
    if fam.reasoning_parser == "deepseek_r1":
        # Seen: the generation prompt opens the thought and smg's named-call constraint is the JSON alone (no
        # </think> first), so the deepseek_r1 reasoning parser reads the whole call as reasoning_content.
        pytest.xfail("a named call under R1's open thought is read as reasoning by smg 1.13")
    calls, finish, _ = _chat(client, stream, tools=TOOLS,
                             tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert len(calls) == 1
    name, args = _name_args(calls[0])
    assert name == "get_weather" and list(args) == ["city"] and args["city"] in ("Paris", "Rome")  # the schema's
    # Kimi K2's named call comes as a structural tag (free text may follow the tagged call, and the random model
    # never ends it): length there; a JSON-only constraint ends with the call.
    assert finish in (("tool_calls", "stop", "length") if fam.tool_call_parser == "kimik2" else ("tool_calls", "stop"))


@pytest.mark.parametrize("stream", [False, True])
def test_auto_reads_the_familys_own_tool_call_text(family_server, stream):
    fam, client, _ = family_server
    if stream and fam.tool_call_parser == "deepseek":
        # Seen: the forced tiny model spells the closing markers in pieces; smg 1.13's streaming deepseek parser
        # then passes them on as content, and for some spellings of the prompt finds no call at all.
        pytest.xfail("smg's streaming deepseek parser needs DeepSeek's markers as single tokens")
    if stream and fam.tool_call_parser == "glm45_moe":
        # Seen: the regex-forced random model spells <tool_call> in byte pieces ('<to', 'o', ...), not as GLM's one
        # token, and smg 1.13's streaming glm45_moe parser then passes it on as content (unstreamed it parses).
        pytest.xfail("smg's streaming glm45_moe parser needs <tool_call> as one token; the forced tiny model "
                     "spells it in pieces")
    forced = re.escape(fam.tool_call("get_weather", ARGS))
    calls, finish, message = _chat(client, stream, tools=TOOLS, tool_choice="auto",
                                   extra_body={"guided_regex": forced})
    assert len(calls) == 1 and _name_args(calls[0]) == ("get_weather", ARGS), (calls, message)
    assert finish == "tool_calls"


def test_reasoning_is_split_out(family_server):
    fam, client, _ = family_server
    forced = re.escape(fam.thought("Paris is in France", "Sunny."))
    _, _, message = _chat(client, False, extra_body={"guided_regex": forced})
    assert message.content == "Sunny." and message.model_extra.get("reasoning_content") == "Paris is in France"
