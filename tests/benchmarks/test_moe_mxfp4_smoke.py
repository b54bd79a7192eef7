"""benchmarks/moe_mxfp4.py end to end on CPU (`--cpu-smoke`, interpreter): rows for every system at every point (the
engine's path, the per-tile path, the forced tiny and dequant paths where they apply, the pre-pass alone, bf16),
the auto path reaching all three MXFP4 paths, and the MXFP4-vs-bf16 check ran (the numbers themselves are
meaningless on CPU)."""
from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys

from moelink.benchmarks import moe_mxfp4
from tests.helpers.fast_interpreter import interpreter_env
from tests.helpers import zygote


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_moe_mxfp4_smoke(tmp_path):
    out = tmp_path / "moe_mxfp4.json"
    env = interpreter_env()
    proc = zygote.run([sys.executable, "-m", "moelink.benchmarks.moe_mxfp4", "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=os.getcwd(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["benchmark"] == "moe_mxfp4" and res["device"] == "cpu"
    points = {(r["shape"], r["tokens"], r["system"]) for r in res["results"]}
    auto = {(r["shape"], r["tokens"]): r["path"] for r in res["results"] if r["system"] == "mxfp4-triton"}
    want = set()
    for s, (E, K, D, I) in moe_mxfp4.SMOKE_SHAPES.items():
        for t in moe_mxfp4.SMOKE_TOKENS:
            names = ["mxfp4-triton", "mxfp4-per-tile", "bf16-triton"]
            names += ["mxfp4-tiny"] if t * K <= moe_mxfp4.SMOKE_TINY_MAX_PAIRS else []
            if t >= moe_mxfp4.DEQUANT_MIN_TOKENS or auto[s, t] == "dequant":
                names += ["mxfp4-dequant", "mxfp4-prepass"]
            want |= {(s, t, n) for n in names}
    assert points == want
    assert {r["path"] for r in res["results"] if r["system"] == "mxfp4-triton"} == {"tiny", "sorted", "dequant"}
    assert all(r["rel_err_vs_bf16"] <= 2e-2 and r["vs_bf16"] > 0 for r in res["results"])
