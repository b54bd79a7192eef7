"""`vllm serve`'s flags on `moelink serve` (issues 48, 54): the examples table of docs/vllm-compat.md walked row by
row, and the effects the table names (--seed, --disable-log-requests). Parsing only, but for the seed test (a tiny
engine). Every flag of `vllm serve --help`, row by row: test_vllm_flag_table.py."""
from __future__ import annotations

import ast
import logging
import re
import shlex
from pathlib import Path

import pytest

from moelink.engine.api.cli import build_parser
from moelink.engine.api.vllm_flags import RequestLogFilter, apply_vllm_engine_flags
from moelink.engine.server.gateway.options import gateway_args
from moelink.engine.api.vllm_kv_config import NIXL_HOST_ENV, NIXL_PORT_ENV, apply_kv_transfer_config
from moelink.engine.server.limits import limits_from

PAGE = Path(__file__).resolve().parents[2] / "docs" / "vllm-compat.md"
BEGIN, END = "<!-- vllm-flags-table -->", "<!-- /vllm-flags-table -->"
CELL = re.compile(r"`([^`]*)`")


def table_rows() -> list[tuple[str, str]]:
    """(flag as a script writes it, 'parses to' cell) of every row."""
    text = PAGE.read_text()
    body = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip().splitlines()[2:]
    rows = []
    for line in body:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3, line
        rows.append((CELL.fullmatch(cells[0]).group(1), cells[2]))
    return rows


ROWS = table_rows()


@pytest.fixture(autouse=True)
def _no_nixl_env(monkeypatch):
    """vLLM's NIXL side-channel variables name the port and host a NixlConnector line serves on: not from the
    environment the tests run in."""
    monkeypatch.delenv(NIXL_PORT_ENV, raising=False)
    monkeypatch.delenv(NIXL_HOST_ENV, raising=False)


def parse_serve(flag: str):
    """`moelink serve MODEL <flag>` as `_serve` reads it before anything loads."""
    ns = build_parser().parse_args(["serve", "MODEL", *shlex.split(flag)])
    apply_kv_transfer_config(ns)
    apply_vllm_engine_flags(ns)
    ns.gateway_args = gateway_args(ns)
    ns.max_logprobs = limits_from(ns).max_logprobs
    return ns


def expected(cell: str) -> dict:
    """`a=1, b='x'` -> {'a': 1, 'b': 'x'} (values are Python literals)."""
    out = {}
    for part in re.split(r",\s*(?=[a-z_]+=)", CELL.fullmatch(cell).group(1)):
        name, value = part.split("=", 1)
        out[name] = ast.literal_eval(value)
    return out


@pytest.mark.parametrize("flag,parses_to", [r for r in ROWS if r[1] not in ("refused", "not walked")],
                         ids=lambda v: v[:40])
def test_an_accepted_row_parses_as_the_table_says(flag, parses_to):
    ns = parse_serve(flag)
    for name, value in expected(parses_to).items():
        assert getattr(ns, name) == value, (flag, name)


@pytest.mark.parametrize("flag", [r[0] for r in ROWS if r[1] == "refused"], ids=lambda v: v[:40])
def test_a_refused_row_stops_with_one_line_naming_the_flag(flag, capsys):
    with pytest.raises((SystemExit, ValueError)) as exc:
        parse_serve(flag)
    if exc.type is ValueError:
        message = str(exc.value)
        assert "\n" not in message
    else:
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1, err  # one line, no usage dump
        message = err
    words = [t.split("=")[0] for t in shlex.split(flag) if t.startswith("-")]
    assert any(w in message for w in words), message


def test_port_help_says_grpc_and_names_the_http_port(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--port PORT moelink's gRPC port (NOT vLLM's HTTP port: the OpenAI API is --http-port" in out
    for flag in ("--max-model-len", "--gpu-memory-utilization", "--max-num-seqs"):
        assert re.search(re.escape(flag) + r" \S+(, --[a-z-]+ \S+)? [a-z]", out), f"{flag} has no help text"


def test_disable_log_requests_drops_the_request_lines():
    keep = RequestLogFilter()

    def record(msg):
        return logging.LogRecord("serving", logging.INFO, __file__, 1, msg, (), None)

    assert not keep.filter(record("request admitted")) and not keep.filter(record("request finished"))
    assert keep.filter(record("%s refused: %s %s"))


def test_log_outputs_and_tokens_as_ids_reach_the_server_config():
    """--enable-log-outputs (with --max-log-len) and --return-tokens-as-token-ids: the server's config (serving.py
    logs the output, the completions route names tokens `token_id:N`); --enable-log-outputs needs the request lines,
    vLLM's rule; --lora-target-modules reaches the engine's LoRA config."""
    from moelink.engine.api.cli_args import engine_args_from
    from moelink.engine.server.cli import server_config_from

    cfg = server_config_from(parse_serve("--enable-log-outputs --max-log-len 5 --return-tokens-as-token-ids"))
    assert (cfg.enable_log_outputs, cfg.max_log_len, cfg.return_tokens_as_token_ids) == (True, 5, True)
    cfg = server_config_from(parse_serve(""))
    assert (cfg.enable_log_outputs, cfg.max_log_len, cfg.return_tokens_as_token_ids) == (False, None, False)
    with pytest.raises(ValueError, match="--enable-log-outputs"):
        server_config_from(parse_serve("--enable-log-outputs --disable-log-requests"))
    args = engine_args_from(parse_serve("--enable-lora --lora-target-modules o_proj qkv_proj"))
    assert args.lora_target_modules == ["o_proj", "qkv_proj"]
    with pytest.raises(ValueError, match="lora_target_modules"):
        engine_args_from(parse_serve("--lora-target-modules o_proj"))._target_modules()


def test_kv_transfer_config_errors_name_the_key():
    for cfg, words in [('{"kv_connector":"MoelinkConnector","kv_role":"kv_producer"}', "kv_port"),
                       ('{"kv_connector":"MoelinkConnector","kv_role":"x"}', "kv_role"),
                       ('{"kv_connector":"MoelinkConnector","kv_role":"kv_both","kv_buffer_size":1}', "kv_buffer_size"),
                       ('{"kv_connector":"MoelinkConnector","kv_role":"kv_consumer",'
                        '"kv_connector_extra_config":{"nope":1}}', "kv_connector_extra_config.nope"),
                       ("[1]", "JSON object"), ("{", "not valid JSON")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            parse_serve(f"--kv-transfer-config '{cfg}'")
    with pytest.raises(ValueError, match="disagree"):
        parse_serve("--role decode --kv-transfer-config "
                    "'{\"kv_connector\":\"MoelinkConnector\",\"kv_role\":\"kv_producer\",\"kv_port\":7100}'")


def test_data_parallel_and_expert_parallel_sizes_must_agree():
    with pytest.raises(ValueError, match="disagree"):
        parse_serve("-dp 2 --enable-expert-parallel -ep 4")
    assert parse_serve("-dp 2 --enable-expert-parallel -ep 2").expert_parallel_size == 2


# -- --seed: the same requests in the same order sample the same tokens in two engines -------------------------
def _sample(path: str, seed):
    from moelink.engine.api.llm import LLM
    from moelink.engine.contract.sampling_params import SamplingParams

    with LLM(path, seed=seed, num_kv_blocks=64, max_num_seqs=4) as llm:
        outs = llm.generate([[1, 2, 3, 4], [5, 6, 7]], SamplingParams(temperature=1.0, max_tokens=12,
                                                                        ignore_eos=True), use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outs]


def test_engine_seed_makes_sampling_reproducible(tiny_model):
    path = tiny_model("qwen3_e6k3")
    first, again, other = _sample(path, 7), _sample(path, 7), _sample(path, 8)
    assert first == again
    assert first != other  # 24 tokens at temperature 1 over a random tiny model: equal by chance ~never
    assert first[0] != first[1]  # each request its own seed, not one shared stream restarted


def test_max_logprobs_refuses_more_on_both_services():
    from smg_grpc_proto.generated import vllm_engine_pb2

    from moelink.engine.server.gen import moelink_v1_pb2
    from moelink.engine.server.limits import RequestLimits

    limits = RequestLimits(max_logprobs=5)
    for pb in (moelink_v1_pb2, vllm_engine_pb2):
        limits.check_sampling(pb.SamplingParams(logprobs=5))
        with pytest.raises(ValueError, match=r"sampling_params.logprobs=6 is invalid: at most 5 .*--max-logprobs"):
            limits.check_sampling(pb.SamplingParams(logprobs=6))


def test_completions_logprobs_are_refused_naming_the_field_not_dropped():
    from moelink.engine.server.gateway.openai_fields import HttpFieldError, rewrite

    with pytest.raises(HttpFieldError, match=r"^logprobs=2 is not supported on /v1/completions") as e:
        rewrite("/v1/completions", {"model": "m", "prompt": "x", "logprobs": 2})
    assert e.value.field == "logprobs"
    assert rewrite("/v1/completions", {"model": "m", "prompt": "x", "logprobs": None}) is None
    assert rewrite("/v1/chat/completions", {"model": "m", "logprobs": True, "top_logprobs": 2}) is None  # chat keeps


def test_a_structural_tag_compiles_as_smg_sends_it_for_a_named_tool_call():
    """smg's named tool_choice for tagged tool-call formats (Kimi K2's) is an xgrammar structural tag; moelink
    compiles it (it refused it before: issue 48). The compiled grammar accepts the tagged call and nothing else."""
    import json as _json

    import xgrammar as xgr

    from moelink.engine.contract.structured_output_params import StructuredOutputParams
    from moelink.engine.core.grammar_child import compile_spec

    tag = _json.dumps({"type": "structural_tag", "format": {"type": "tag", "begin": "<call>", "end": "</call>",
                                                             "content": {"type": "json_schema", "json_schema": {
                                                                 "type": "object", "properties": {"city": {
                                                                     "type": "string", "enum": ["Paris"]}},
                                                                 "required": ["city"]}}}})
    kind, spec = StructuredOutputParams(structural_tag=tag).key
    vocab = [chr(c) for c in range(32, 127)]
    compiled = compile_spec(xgr.GrammarCompiler(xgr.TokenizerInfo(vocab)), kind, spec)
    for text, ok in (('<call>{"city": "Paris"}</call>', True), ('<call>{"city": "Rome"}</call>', False)):
        matcher = xgr.GrammarMatcher(compiled)
        accepted = all(matcher.accept_token(vocab.index(ch)) for ch in text)
        assert accepted == ok, text
    with pytest.raises(ValueError, match="structural_tag"):
        StructuredOutputParams(structural_tag="")


@pytest.mark.parametrize("flags, executor", [
    ("--distributed-executor-backend mp", "mp"),
    ("--distributed-executor-backend uni", "inprocess"),
    ("--distributed-executor-backend ray", "ray"),
    # vLLM's default on a multi-GPU node: moelink runs more than one rank on Ray.
    ("--distributed-executor-backend mp -tp 2", "auto"),
    ("--distributed-executor-backend mp --data-parallel-size 2 --enable-expert-parallel", "auto"),
    ("--executor mp", "mp"),
    ("", "auto"),
])
def test_vllms_executor_backend_is_moelinks_executor(flags, executor):
    assert parse_serve(flags).executor == executor


def test_two_executor_flags_that_disagree_are_refused():
    with pytest.raises(ValueError, match="--distributed-executor-backend=ray and --executor=mp disagree"):
        parse_serve("--distributed-executor-backend ray --executor mp")
