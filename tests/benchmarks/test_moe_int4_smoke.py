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
from tests.helpers.fast_interpreter import interpreter_env
from tests.helpers import zygote


def test_moe_int4_bytes(tmp_path):
    res = moe_int4.main(["--bytes", "--out", str(tmp_path / "b.json")])
    kimi = [r for r in res["results"] if r["shape"] == "kimi-k2"]
    assert [r["tokens"] for r in kimi] == list(moe_int4.BYTES_TOKENS)
    assert all(abs(r["weight_ratio"] - 0.28125) < 1e-9 and 0.28 < r["ratio"] < 0.29 for r in kimi)
    gptq = [r for r in res["results"] if r["shape"] != "kimi-k2"]
    assert all(abs(r["weight_ratio"] - (0.5 + 3 / 128) / 2) < 1e-9 for r in gptq)  # group 128 + zero points


@pytest.mark.slow  # the interpreter runs both systems (~5 s on 2 busy cores)
def test_moe_int4_smoke(tmp_path):
    out = tmp_path / "moe_int4.json"
    env = interpreter_env()
    proc = zygote.run([sys.executable, "-m", "moelink.benchmarks.moe_int4", "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=os.getcwd(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["benchmark"] == "moe_int4" and res["device"] == "cpu"
    points = {(r["shape"], r["tokens"], r["system"]) for r in res["results"]}
    assert points == {(s, t, n) for s in moe_int4.SMOKE_SHAPES for t in moe_int4.SMOKE_TOKENS
                      for n in ("int4-triton", "bf16-triton")}
    assert all(r["rel_err_vs_bf16"] <= 2e-2 for r in res["results"])


def test_moe_int4_prefill_counts(tmp_path):
    """--prefill --counts: the per-tile path streams ~0.3x bf16's bytes at every size but decodes each weight once
    per M tile; the dequant path decodes once and moves more than bf16 (the pass: INT4 in, bf16 out and back), by
    less as the batch grows. Worked by hand for Kimi at EP 8, T=4096: 683 rows an expert, 6 M tiles of 128 -> 6x the
    decodes; HBM: tile 48 x 0.5625 B x 3DI once, dequant 48 x (0.5625 + 4) B x 3DI, bf16 48 x 2 B x 3DI."""
    res = moe_int4.main(["--prefill", "--counts", "--out", str(tmp_path / "p.json")])
    rows = {(r["shape"], r["tokens"]): r for r in res["results"]}
    assert set(rows) == {(s, t) for s in moe_int4.PREFILL_SHAPES for t in moe_int4.PREFILL_TOKENS}
    k = rows[("kimi-k2-ep8", 4096)]
    assert k["rows_per_expert"] == 4096 * 8 / 48 and k["decoded_tile_over_dequant"] == pytest.approx(6)
    weights = 48 * 3 * 7168 * 2048
    acts = 4096 * 7168 * 4 + 4096 * 8 * (2048 * 4 + 7168 * 2)
    assert k["tile_hbm_GB"] * 1e9 == pytest.approx(weights * 0.5625 + acts)
    assert k["dequant_hbm_GB"] * 1e9 == pytest.approx(weights * 4.5625 + acts)
    assert k["bf16_hbm_GB"] * 1e9 == pytest.approx(weights * 2 + acts)
    for r in rows.values():
        assert 0.29 < r["tile_stream_ratio"] < 0.35 and r["dequant_hbm_ratio"] > 1
    big = [rows[("kimi-k2-ep8", t)]["dequant_stream_ratio"] for t in moe_int4.PREFILL_TOKENS]
    assert big == sorted(big, reverse=True)  # the pass is paid once: its share falls as T grows


@pytest.mark.slow  # the interpreter runs three systems (one size: 12 tokens, 3 rows an expert)
def test_moe_int4_prefill_smoke(tmp_path):
    out = tmp_path / "moe_int4_prefill.json"
    proc = zygote.run([sys.executable, "-m", "moelink.benchmarks.moe_int4", "--cpu-smoke", "--prefill", "--tokens",
                           "12", "--out", str(out)], capture_output=True, text=True, env=interpreter_env(),
                          cwd=os.getcwd(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["benchmark"] == "moe_int4_prefill"
    assert {r["system"] for r in res["results"]} == {"int4-tile", "int4-dequant", "bf16-triton"}
    assert proc.stdout.count("RATIO smoke T=12") == 1 and all(r["rel_err_vs_bf16"] <= 2e-2 for r in res["results"])
