"""Generated stubs are current, `moelink serve` flags reach the right configs, and the load benchmark runs."""
from __future__ import annotations

import json
import subprocess
from importlib import resources

import pytest

from moelink.engine.api.cli import build_parser
from moelink.engine.api.cli_args import engine_args_from


def test_generated_stubs_are_current():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) regenerates the stubs")
    from moelink.engine.server import protogen

    assert protogen.stale_files() == [], "run: python -m moelink.engine.server.protogen"


def test_proto_ships_with_the_package():
    proto = resources.files("moelink.engine.server") / "protos" / "moelink_v1.proto"
    text = proto.read_text()
    assert "package moelink.v1;" in text and "service Generation" in text
    from moelink.engine.server.gen import moelink_v1_pb2

    methods = {m.name for m in moelink_v1_pb2.DESCRIPTOR.services_by_name["Generation"].methods}
    assert methods == {"Generate", "Abort", "ModelInfo", "ServerInfo", "ExpertLoad"}


def test_serve_flags(tmp_path):
    from moelink.engine.server import cli as server_cli

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"  # TLS files are checked when the config is made: a real pair
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                        "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl could not make a certificate: {exc}")
    ns = build_parser().parse_args([
        "serve", "some-model", "--host", "0.0.0.0", "--port", "0", "--max-num-seqs", "8", "--max-queued-requests", "5",
        "--max-queued-tokens", "900", "--shutdown-grace", "2.5", "--tls-cert", str(cert), "--tls-key", str(key),
        "--api-key", "k", "--served-model-name", "m", "--max-message-size", "4096", "--expert-parallel-size", "2",
        "--gateway-port", "50052"])
    cfg = server_cli.server_config_from(ns)
    assert (cfg.host, cfg.port, cfg.max_queued_requests, cfg.max_queued_tokens, cfg.shutdown_grace) == ("0.0.0.0", 0, 5, 900, 2.5)
    assert (cfg.tls, cfg.api_key, cfg.served_model_name, cfg.max_message_size) == (True, "k", "m", 4096)
    assert (cfg.gateway_port, cfg.gateway_host) == (50052, "127.0.0.1")
    args = engine_args_from(ns)
    assert (args.model, args.max_num_seqs, args.expert_parallel_size) == ("some-model", 8, 2)


@pytest.mark.parametrize("kwargs,field", [
    (dict(port=70000), "port"), (dict(port=-1), "port"), (dict(host=""), "host"),
    (dict(max_queued_requests=0), "max_queued_requests"), (dict(max_queued_tokens=-5), "max_queued_tokens"),
    (dict(shutdown_grace=-1.0), "shutdown_grace"), (dict(tls_cert="/nope.pem"), "tls_key"),
    (dict(tls_cert="/nope.pem", tls_key="/nope.key"), "tls_cert"), (dict(api_key=" "), "api_key"),
    (dict(max_message_size=10), "max_message_size"), (dict(served_model_name=""), "served_model_name"),
])
def test_server_config_validation(kwargs, field):
    from moelink.engine.server.config import ServerConfig

    with pytest.raises(ValueError, match=field):
        ServerConfig(**kwargs)


def test_serve_cli_reports_bad_flags_before_loading(capsys):
    from moelink.engine.api.cli import main

    assert main(["serve", "/no/such/model", "--port", "0", "--max-queued-requests", "0"]) == 2
    assert "max_queued_requests=0" in capsys.readouterr().err


def test_bench_serve_against_the_server(server, tmp_path, capsys):
    from moelink.engine.api.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench-serve", "--target", server.addr, "--concurrency", "1,3", "--rates", "40",
                 "--num-requests", "6", "--input-len", "8", "--output-len", "6", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [lv["mode"] for lv in result["levels"]] == ["closed_loop", "closed_loop", "poisson"]
    for lv in result["levels"]:
        assert lv["completed"] == lv["num_requests"] and not lv["errors"]
        assert lv["ttft_ms"]["p50"] > 0 and lv["e2e_ms"]["p99"] >= lv["e2e_ms"]["p50"]
        assert lv["request_throughput"] > 0 and 0 <= lv["goodput_fraction"] <= 1
    assert result["model"]["name"] == "tiny-moe" and result["meta"]["commit"]
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "| load |" in capsys.readouterr().out
