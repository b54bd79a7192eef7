"""benchmarks/moe_int4.py on CPU: the byte count (--bytes: INT4 reads ~0.28x bf16's bytes per decode step at Kimi's
group 32) and the script end to end in the interpreter (--cpu-smoke: both systems at every point, the INT4-vs-bf16
check ran; the times are meaningless on CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moelink.benchmarks import moe_int4


def test_moe_int4_bytes(tmp_path):
    res = moe_int4.main(["--bytes", "--out", str(tmp_path / "b.json")])
    kimi = [r for r in res["results"] if r["shape"] == "kimi-k2"]
    assert [r["tokens"] for r in kimi] == list(moe_int4.BYTES_TOKENS)
    assert all(abs(r["weight_ratio"] - 0.28125) < 1e-9 and 0.28 < r["ratio"] < 0.29 for r in kimi)
    gptq = [r for r in res["results"] if r["shape"] != "kimi-k2"]
    assert all(abs(r["weight_ratio"] - (0.5 + 3 / 128) / 2) < 1e-9 for r in gptq)  # group 128 + zero points


@pytest.mark.slow  # the interpreter runs both systems (~40 s on 2 cores)
def test_moe_int4_smoke(tmp_path):
    out = tmp_path / "moe_int4.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "moelink.benchmarks.moe_int4", "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=os.getcwd(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["benchmark"] == "moe_int4" and res["device"] == "cpu"
    points = {(r["shape"], r["tokens"], r["system"]) for r in res["results"]}
    assert points == {(s, t, n) for s in moe_int4.SMOKE_SHAPES for t in moe_int4.SMOKE_TOKENS
                      for n in ("int4-triton", "bf16-triton")}
    assert all(r["rel_err_vs_bf16"] <= 2e-2 for r in res["results"])
