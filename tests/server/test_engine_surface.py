"""The server sees the engine only through AsyncEngine's own surface (info, process_inputs, stats, expert_load,
the metrics sink it was made with), never the LLMEngine inside it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers.fakes import NoMetricsEngine

SERVER = Path(__file__).resolve().parents[2] / "engine" / "server"


def test_the_server_never_reaches_into_the_engine():
    for path in SERVER.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "engine" and isinstance(node.value, ast.Attribute):
                assert node.value.attr != "engine", f"{path.name}:{node.lineno} reads engine.engine"


def test_metrics_need_an_engine_made_with_a_sink():
    from moelink.engine.server.config import ServerConfig
    from moelink.engine.server.server import MoelinkServer

    with pytest.raises(ValueError, match=r"metrics_port=0 needs an engine that exports metrics"):
        MoelinkServer(NoMetricsEngine(), ServerConfig(port=0, metrics_port=0))
