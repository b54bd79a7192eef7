"""benchmarks/hybrid_state.py (issue 42's benchmark): the memory part's byte counts against the layer kinds' own
formulas (the linear state does not grow with context, the KV grows linearly), the CPU smoke run through the GPU
session's `hybrid` step (the JSON's shape, not speed), and the step's budget line. Speed is never asserted."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from moelink.benchmarks import hybrid_state
from moelink.engine.models.gated_deltanet_config import LinearAttentionConfig
from tests.helpers import zygote
# The script run as the other gpu_session tests run it: its `python -m` children forked from the test zygote (torch
# imported there once), not a fresh interpreter importing torch and transformers per run (~2 s of CPU each).
from tests.helpers.gpu_session import session

SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool returns
PLAN = re.compile(r"^PLAN step=(\S+) cmd=(\S+) gemm_compiles=(\d+) slow_compiles=(\d+) other_compiles=(\d+) "
                  r"run_s=(\d+) budget_s=(\d+) :: (.*)$", re.M)
STEP_BUDGET_S = 570  # test_gpu_session.py holds the script to it


def check_memory_rows(rows: dict) -> None:
    """Each model's row agrees with itself: state per sequence = linear layers x state per layer, the same at every
    context; KV = bytes per token x context; total = state + KV."""
    for r in rows.values():
        assert r["state_bytes_per_sequence"] == r["linear_layers"] * r["state_bytes_per_layer"]
        assert r["linear_layers"] + r["full_layers"] == r["layers"]
        per = r["per_sequence"]
        assert sorted(map(int, per)) == list(hybrid_state.CONTEXTS)
        for c, m in per.items():
            assert m["state_bytes"] == r["state_bytes_per_sequence"]  # independent of context
            assert m["kv_bytes"] == r["kv_bytes_per_token"] * int(c)  # linear in it
            assert m["total_bytes"] == m["state_bytes"] + m["kv_bytes"]
        assert 0 < r["active_params_per_token_no_embeddings"] < r["total_params"]


def test_memory_part_counts_the_published_shapes_by_their_layer_kinds(tmp_path):
    out = tmp_path / "mem.json"
    res = hybrid_state.main(["--cpu-smoke", "--parts", "memory", "--json", str(out)])
    assert json.loads(out.read_text())["memory"] == res["memory"]
    mem = res["memory"]
    nxt, moe = mem["models"]["Qwen3-Next-80B-A3B"], mem["models"]["Qwen3-30B-A3B"]
    check_memory_rows(mem["models"])
    check_memory_rows(mem["measured_models"])
    # Qwen3-Next-80B-A3B: 36 gated DeltaNet layers (16 key / 32 value heads of 128, conv 4) + 12 full (2 kv heads
    # of 256)
    la = LinearAttentionConfig(16, 32, 128, 128, 4)
    assert (nxt["layers"], nxt["linear_layers"], nxt["full_layers"]) == (48, 36, 12)
    assert nxt["state_bytes_per_layer"] == la.state_bytes_per_sequence(torch.bfloat16)
    assert la.state_bytes_per_sequence(torch.bfloat16) == 3 * 8192 * 2 + 32 * 128 * 128 * 4
    assert nxt["kv_bytes_per_token"] == 12 * 2 * 2 * 256 * 2
    # Qwen3-30B-A3B: 48 GQA layers of 4 kv heads of 128, no state
    assert (moe["layers"], moe["linear_layers"], moe["state_bytes_per_sequence"]) == (48, 0, 0)
    assert moe["kv_bytes_per_token"] == 48 * 2 * 4 * 128 * 2
    # "80B-A3B" and "30B-A3B": the engine's own models on the meta device
    assert round(nxt["total_params"] / 1e9) == 80 and round(moe["total_params"] / 1e9) == 31
    assert 2.5e9 < moe["active_params_per_token_no_embeddings"] < nxt["active_params_per_token_no_embeddings"] < 3.5e9
    # The hybrid's share of the full model's bytes per sequence falls with context, toward its KV share (1/4 per token)
    ratio = [mem["hybrid_over_moe_bytes_per_sequence"][str(c)] for c in hybrid_state.CONTEXTS]
    assert ratio == sorted(ratio, reverse=True) and ratio[-1] > 0.25
    # The measured pair: the same MoE block and attention widths (module docstring), 3 linear : 1 full
    h, m = res["models"]["hybrid"]["config"], res["models"]["moe"]["config"]
    for k in ("hidden_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "num_hidden_layers"):
        assert h[k] == m[k], k
    assert h["linear_num_key_heads"] * h["linear_key_head_dim"] == m["num_key_value_heads"] * m["head_dim"]
    assert h["linear_num_value_heads"] * h["linear_value_head_dim"] == m["num_attention_heads"] * m["head_dim"]
    mh = mem["measured_models"]["hybrid"]
    assert mh["linear_layers"] == 3 * mh["full_layers"] and h["shared_expert_intermediate_size"] == 0


@pytest.mark.slow
def test_cpu_smoke_of_the_hybrid_step_writes_decode_and_prefill_rows(tmp_path):
    """The session's `hybrid` step on CPU (the toy pair, seconds): one device-safe JSON with the memory part, a decode
    row per batch and a prefill row per length, both models in each."""
    proc = session("--cpu-smoke", "hybrid", out=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (f,) = tmp_path.iterdir()
    assert f.name == "hybrid_state_cpu_smoke.json" and SAFE_NAME.match(f.name)
    doc = json.loads(f.read_text())
    for k in ("device", "date", "commit", "models", "memory", "decode", "prefill", "prefill_growth", "prefill_mode"):
        assert k in doc, k
    assert doc["cpu_smoke"] and doc["device"] == "cpu" and doc["skipped"] == []
    assert doc["decode_graph_sizes"] == {"hybrid": [], "moe": []}  # no CUDA graphs on CPU: said, not assumed
    check_memory_rows(doc["memory"]["models"])
    smoke = hybrid_state.SIZES["smoke"]
    assert [r["batch"] for r in doc["decode"]] == list(smoke["batches"])
    for r in doc["decode"]:
        for k in ("hybrid", "moe"):
            assert r[k]["decode_tok_s"] > 0 and r[k]["decode_tok_per_cpu_s"] > 0
            assert len(r[k]["samples"]) == smoke["decode_repeats"]
        assert r["hybrid_over_moe_tok_s"] == pytest.approx(r["hybrid"]["decode_tok_s"] / r["moe"]["decode_tok_s"])
    assert [r["length"] for r in doc["prefill"]] == list(smoke["lengths"])
    for r in doc["prefill"]:
        for k in ("hybrid", "moe"):
            assert r[k]["ms_per_token"] == pytest.approx(r[k]["s"] / r["length"] * 1e3)
            assert r[k]["cpu_ms_per_token"] == pytest.approx(r[k]["cpu_s"] / r["length"] * 1e3)
    g = doc["prefill_growth"]
    assert (g["from"], g["to"]) == (smoke["lengths"][0], smoke["lengths"][-1])
    assert all(g[k] > 0 for k in ("hybrid", "moe", "hybrid_cpu_time", "moe_cpu_time"))
    decode_table_row = r"^\| 1 \| \d+ \| \d+ (\| [\d.]+ ){6}\|$"
    assert re.search(decode_table_row, proc.stdout, re.M), proc.stdout[-2000:]


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_hybrid_step_is_one_budgeted_command_named_by_device_and_commit():
    proc = session("--dry-run", "hybrid")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (plan,) = PLAN.findall(proc.stdout)
    step, name, gemm, slow, other, run_s, budget, command = plan
    assert (step, name) == ("hybrid", "hybrid_state") and int(gemm) > 0 and int(other) > 0
    assert int(budget) <= STEP_BUDGET_S and f"total_budget_s={budget} " in proc.stdout
    assert "-m moelink.benchmarks.hybrid_state --size gpu " in command
    assert int(re.search(r"--time-budget-s (\d+)", command)[1]) == int(budget) - 90
    out = re.search(r"--json (\S+)$", command)[1]
    assert re.fullmatch(r"benchmarks/results/hybrid_state_cpu_[0-9a-f]+(-dirty)?\.json", out), out
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", command.split("hybrid_state", 1)[1]))
    helptext = zygote.run([sys.executable, "-m", "moelink.benchmarks.hybrid_state", "--help"], capture_output=True,
                              text=True, timeout=120, check=True).stdout
    assert all(f in helptext for f in flags), flags
    assert session("--dry-run", "hybrid", "--bogus").returncode == 2
