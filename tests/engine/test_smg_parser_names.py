"""Issue 54 item 5: a mistyped `--tool-call-parser` / `--reasoning-parser` is refused before anything loads, with one
line listing the names smg takes (engine/api/smg_parsers.py reads them from smg's own registry). It was refused by
smg itself once the model had loaded and warmed (20.8 s), with a fork server traceback printed besides."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from moelink.engine.api.cli import build_parser
from moelink.engine.server.gateway.parsers import smg_parser_names
from moelink.engine.server.gateway.options import gateway_args
from tests.helpers import zygote

BUILTIN = str(Path(__file__).resolve().parents[2] / "builtin-model")

pytestmark = pytest.mark.skipif(smg_parser_names() is None, reason="smg (PyPI `smg`) is not installed")


def _gateway_args(*flags: str):
    return gateway_args(build_parser().parse_args(["serve", "MODEL", *flags]))


@pytest.mark.parametrize("flag,value,near,listed", [
    ("--tool-call-parser", "qwne", "qwen", "kimik2"),
    ("--reasoning-parser", "deepseek-r1", "deepseek_r1", "qwen3"),
])
def test_a_mistyped_parser_is_one_line_listing_smgs_names(flag, value, near, listed):
    with pytest.raises(ValueError) as exc:
        _gateway_args(flag, value)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{flag}={value!r} is invalid (did you mean {near}?)"), message
    assert f" {listed}," in message and "vLLM's" in message, message


def test_smgs_names_and_vllms_pass():
    names = smg_parser_names()
    assert "qwen" in names["tool_call"] and "deepseek_r1" in names["reasoning"]
    assert _gateway_args("--tool-call-parser", "hermes", "--reasoning-parser", "kimi_k2") == (
        "--tool-call-parser", "qwen", "--reasoning-parser", "kimi")
    assert _gateway_args("--tool-call-parser", "glm45_moe", "--reasoning-parser", "glm45") == (
        "--tool-call-parser", "glm45_moe", "--reasoning-parser", "glm45")
    assert _gateway_args("--tool-call-parser", "openai", "--reasoning-parser", "openai_gptoss") == ()  # gpt-oss


def test_serve_refuses_it_before_the_model_loads():
    t0 = time.monotonic()
    out = zygote.run([sys.executable, "-m", "moelink.engine.api.cli", "serve", BUILTIN, "--port", "0",
                          "--http-port", "0", "--reasoning-parser", "qwen3", "--tool-call-parser", "qwne"],
                         capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == 2, lines[-5:]
    assert len(lines) == 1 and lines[0].startswith("moelink: error: --tool-call-parser='qwne' is invalid"), lines
    assert took < 15, took  # it was 20.8 s: the weights loaded and warmed first (a few seconds is Python's imports)
