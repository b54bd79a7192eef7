"""Issue 56 item 5: the gateway package is the one place that knows smg. The rest of the server hands it typed
options (engine/server/gateway/options.py, GatewayOptions) and asks it for smg's command line, its start line and
the commands of a gateway started by hand; vLLM's flags the gateway reads are the rows engine/api/vllm_flag_table.py
marks `http_gateway` (the table's floor cannot import the gateway), registered by the gateway package. No smg
process: the parser-name registry is read when smg is installed, and the names used here are smg's or vLLM's."""
from __future__ import annotations

import argparse

import pytest

from moelink.engine.api.vllm_flag_table import ALL_FLAGS
from moelink.engine.server.config import ServerConfig
from moelink.engine.server.gateway.front_cli import by_hand_commands
from moelink.engine.server.gateway.options import (GATEWAY_FLAGS, GatewayOptions, add_gateway_flags, alias_args,
                                                   gateway_options, model_alias_refusal)
from moelink.engine.server.gateway.managed import chat_template_of, server_worker_url
from moelink.engine.server.gateway.supervisor import GatewaySpec, GatewaySupervisor


def test_the_table_marks_exactly_the_flags_the_gateway_registers():
    marked = {s for key, f in ALL_FLAGS.items() if f.http_gateway for s in key}
    assert marked == set(GATEWAY_FLAGS)
    assert all(ALL_FLAGS[key].kind == "accepted" for key in ALL_FLAGS if ALL_FLAGS[key].http_gateway)
    p = argparse.ArgumentParser()
    add_gateway_flags(p)
    assert {s for a in p._actions for s in a.option_strings} - {"-h", "--help"} == set(GATEWAY_FLAGS)


def test_serve_registers_the_gateway_flags_in_vllms_server_group():
    from moelink.engine.api.cli import build_parser

    serve = build_parser("serve")._subparsers._group_actions[0].choices["serve"]
    (group,) = [g for g in serve._action_groups if g.title == "vLLM's names, server side (docs/vllm-compat.md)"]
    assert set(GATEWAY_FLAGS) <= {s for a in group._group_actions for s in a.option_strings}


def test_options_translate_to_smgs_command_line():
    assert GatewayOptions().args() == ()
    assert GatewayOptions(tool_call_parser="hermes", reasoning_parser="kimi_k2", chat_template="t.jinja").args() == (
        "--tool-call-parser", "qwen", "--reasoning-parser", "kimi", "--chat-template", "t.jinja")
    assert GatewayOptions(tool_call_parser="openai", reasoning_parser="openai_gptoss").args() == ()  # gpt-oss
    with pytest.raises(ValueError, match=r"tool_call_parser='' is invalid"):
        GatewayOptions(tool_call_parser="")


def test_gateway_options_from_the_flags():
    ns = argparse.Namespace(enable_auto_tool_choice=True, tool_call_parser=None, reasoning_parser=None,
                            chat_template=None)
    with pytest.raises(ValueError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        gateway_options(ns)
    ns.tool_call_parser = "qwen"
    assert gateway_options(ns) == GatewayOptions(tool_call_parser="qwen")


def test_server_config_holds_the_options_and_refuses_an_alias_smg_cannot_read():
    assert ServerConfig().gateway == GatewayOptions()
    with pytest.raises(ValueError, match="gateway=.* must be a GatewayOptions"):
        ServerConfig(gateway=("--tool-call-parser", "qwen"))  # type: ignore[arg-type]
    assert model_alias_refusal("tiny") is None
    with pytest.raises(ValueError, match=r"a further name \('a=b'\) cannot contain '=': the OpenAI gateway \(smg\) "
                                         r"reads its aliases as NAME=MODEL; only the first name may"):
        ServerConfig(served_model_name=["x=y", "a=b"])
    assert ServerConfig(served_model_name=["x=y", "b"]).served_model_name == ("x=y", "b")


def test_the_commands_by_hand_carry_the_aliases_and_the_options():
    options = GatewayOptions(tool_call_parser="hermes")
    one = by_hand_commands("grpc://127.0.0.1:50051", options, "m", ("tiny",), None, "/models/m")
    assert one.startswith("smg launch --host 127.0.0.1 --port 8001 --worker-urls grpc://127.0.0.1:50051 ")
    assert "--model-alias tiny=m --tool-call-parser qwen & moelink http-front" in one
    assert by_hand_commands("grpc://127.0.0.1:50051", options, "m", (), "kv_both", "/models/m") == \
        by_hand_commands("grpc://127.0.0.1:50051", options, "m", (), None, "/models/m")
    pd = by_hand_commands("grpc://127.0.0.1:50061", GatewayOptions(), "m", (), "kv_producer", "/models/m")
    assert pd.startswith("smg launch --pd-disaggregation --prefill grpc://127.0.0.1:50061 ")
    assert alias_args(None, ("tiny",)) == []


def test_the_managed_gateway_reads_its_template_and_names_itself(tmp_path):
    assert chat_template_of(GatewayOptions()) is None
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0].content }}\n")
    assert chat_template_of(GatewayOptions(chat_template=str(template))) == "{{ messages[0].content }}"
    spec = GatewaySpec(http_host="127.0.0.1", http_port=1, worker_url="grpc://127.0.0.1:2", metrics_host="::1")
    gateway = GatewaySupervisor(spec, exe="/bin/true")
    gateway.metrics_port = 29000
    assert gateway.describe() == "smg gateway pid None; its metrics on http://::1:29000/metrics"


def test_the_gateway_dials_the_keyless_listener_when_there_is_one():
    config = ServerConfig(host="0.0.0.0", port=50051)
    assert server_worker_url(config, 50051, None) == "grpc://127.0.0.1:50051"
    assert server_worker_url(ServerConfig(gateway_host="::1"), 50051, 50052) == "grpc://[::1]:50052"
