"""benchmarks/moe_nvfp4.py end to end on CPU (`--cpu-smoke`, interpreter): rows for both systems at every point,
and the NVFP4-vs-bf16 check ran (the numbers themselves are meaningless on CPU)."""
from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys

from moelink.benchmarks import moe_nvfp4
from tests.helpers.fast_interpreter import interpreter_env
from tests.helpers import zygote


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_moe_nvfp4_smoke(tmp_path):
    out = tmp_path / "moe_nvfp4.json"
    env = interpreter_env()
    proc = zygote.run([sys.executable, "-m", "moelink.benchmarks.moe_nvfp4", "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=os.getcwd(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["benchmark"] == "moe_nvfp4" and res["device"] == "cpu"
    points = {(r["shape"], r["tokens"], r["system"]) for r in res["results"]}
    assert points == {(s, t, n) for s in moe_nvfp4.SMOKE_SHAPES for t in moe_nvfp4.SMOKE_TOKENS
                      for n in ("nvfp4-triton", "bf16-triton")}
    assert all(r["rel_err_vs_bf16"] <= 2e-2 for r in res["results"])
