"""aiperf against the managed gateway, offline, with the absolute tokenizer path `moelink serve` prints.

aiperf installs into the project's venv (docs/benchmarks.md: Benchmark clients); the test finds it through $AIPERF, beside
this Python (a venv that was not activated) or on PATH, and is skipped without it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request

import pytest

from tests.helpers.grpc_server import ENGINE_FLAGS, ServerProcess
from tests.helpers.net import free_port
from tests.helpers.smg_gateway import smg_executable

REQUESTS, OUTPUT_LEN = 8, 16


def _aiperf():
    beside = os.path.join(os.path.dirname(sys.executable), "aiperf")
    exe = os.environ.get("AIPERF") or (beside if os.access(beside, os.X_OK) else shutil.which("aiperf"))
    return exe if exe and os.path.exists(exe) else None


def _generated_tokens(metrics_port: int) -> float:
    """moelink's own count of generated tokens (its Prometheus counter), the oracle for aiperf's."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return float(re.search(r"^moelink_generation_tokens_total (\S+)$", text, re.M).group(1))


@pytest.mark.slow
def test_aiperf_counts_match_the_server(model_path, tmp_path):
    exe = _aiperf()
    if exe is None or smg_executable() is None:
        pytest.skip("aiperf (set $AIPERF) or the smg gateway is not installed")
    metrics_port = free_port()
    srv = ServerProcess(model_path, ENGINE_FLAGS + ["--served-model-name", "tiny-moe", "--http-port", str(free_port()),
                                                    "--metrics-port", str(metrics_port)])
    try:
        port = int(srv.wait_for_line(r"moelink: OpenAI API on http://127\.0\.0\.1:(\d+)/v1", 30, "the API line").group(1))
        tokenizer = srv.wait_for_line(r"moelink: tokenizer: (/\S+)", 5, "the tokenizer line").group(1)
        before = _generated_tokens(metrics_port)
        # No HF_HUB_OFFLINE: aiperf's offline mode looks every name up in the hub cache, a local path too;
        # an absolute path is loaded from disk without it. No network is needed either way.
        # The hub's address points nowhere, so any lookup there fails the run: the path alone must do.
        env = {**{k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")},
               "HF_ENDPOINT": "http://127.0.0.1:9"}
        out = tmp_path / "aiperf"
        proc = subprocess.run(
            [exe, "profile", "--model", "tiny-moe", "--url", f"http://127.0.0.1:{port}", "--endpoint-type", "chat",
             "--streaming", "--tokenizer", tokenizer, "--request-count", str(REQUESTS), "--concurrency", "2",
             "--prompt-input-tokens-mean", "32", "--prompt-output-tokens-mean", str(OUTPUT_LEN),
             "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"max_tokens:{OUTPUT_LEN}",
             # The random-weight tiny model writes bytes that re-tokenize differently (issue 14): count what
             # the server says it generated, as its ITL needs.
             "--use-server-token-count", "--random-seed", "1", "--ui", "none", "--no-auto-plot",
             "--output-artifact-dir", str(out)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        served = _generated_tokens(metrics_port) - before
    finally:
        srv.stop()
        srv.close()
    report = json.loads((out / "profile_export_aiperf.json").read_text())
    assert report["request_count"]["avg"] == REQUESTS and not report.get("error_request_count")
    counted = report["total_output_tokens"]["avg"]
    assert served == REQUESTS * OUTPUT_LEN  # ignore_eos: every request ran to max_tokens
    assert abs(counted - served) <= 0.01 * served, (counted, served)
