"""The vLLM peer benchmark (issue 78) without vLLM: its dry run's commands, and the tables and ratios read from a
canned `vllm bench serve --save-result` JSON and canned offline worker results."""
from __future__ import annotations

import pytest

from moelink.benchmarks import peer_vllm

# What `vllm bench serve --save-result` (vLLM 0.32) writes, trimmed to the fields the benchmark reads and a few more.
CANNED = {
    "date": "20261127-235959", "endpoint_type": "openai", "backend": "openai", "label": None,
    "model_id": "builtin-model", "tokenizer_id": "builtin-model", "num_prompts": 32, "request_rate": "inf",
    "burstiness": 1.0, "max_concurrency": 8, "duration": 1.25, "completed": 32, "failed": 0,
    "total_input_tokens": 2048, "total_output_tokens": 1024, "request_throughput": 25.6,
    "request_goodput": None, "output_throughput": 819.2, "total_token_throughput": 2457.6,
    "max_output_tokens_per_s": 960.0, "max_concurrent_requests": 8, "mean_ttft_ms": 40.1, "median_ttft_ms": 38.5,
    "std_ttft_ms": 5.0, "p99_ttft_ms": 60.2, "mean_tpot_ms": 8.1, "median_tpot_ms": 8.0, "p99_tpot_ms": 9.9,
    "mean_itl_ms": 8.3, "median_itl_ms": 6.5, "p99_itl_ms": 20.1, "input_lens": [64] * 32,
}


def _served(engine, rnd, conc, scale, endpoint="completions"):
    r = peer_vllm.parse_bench_result({**CANNED, "output_throughput": CANNED["output_throughput"] * scale,
                                      "median_itl_ms": CANNED["median_itl_ms"] / scale})
    return {"engine": engine, "round": rnd, "endpoint": endpoint, "concurrency": conc, **r}


def test_parse_reads_vllms_names_and_refuses_a_result_without_them():
    r = peer_vllm.parse_bench_result(CANNED)
    assert r["output_throughput"] == 819.2 and r["median_ttft_ms"] == 38.5
    assert r["median_itl_ms"] == 6.5 and r["request_throughput"] == 25.6
    assert r["completed"] == 32 and r["failed"] == 0 and "input_lens" not in r and r["burst"] is False
    assert peer_vllm.parse_bench_result({**CANNED, "median_itl_ms": 0.004})["burst"] is True
    with pytest.raises(ValueError, match="median_itl_ms"):
        peer_vllm.parse_bench_result({k: v for k, v in CANNED.items() if k != "median_itl_ms"})


def test_served_medians_over_rounds_and_ratios_moelink_over_vllm():
    runs = [_served("moelink", 0, 8, 0.25), _served("vllm", 0, 8, 1.0), _served("moelink", 1, 8, 0.5),
            _served("vllm", 1, 8, 1.0), _served("moelink", 2, 8, 0.75), _served("vllm", 2, 8, 1.0),
            _served("moelink", 0, 1, 1.0), _served("vllm", 0, 1, 2.0),
            {"engine": "vllm", "round": 1, "endpoint": "completions", "concurrency": 1, "error": "exit 1"}]
    rows = peer_vllm.summarize_served(runs)
    assert [(r["endpoint"], r["concurrency"]) for r in rows] == [("completions", 1), ("completions", 8)]
    c8 = rows[1]
    assert c8["moelink"]["output_throughput"] == pytest.approx(819.2 * 0.5)
    assert c8["moelink"]["rounds"] == 3 and rows[0]["vllm"]["rounds"] == 1  # the failed run is left out
    assert c8["ratio"]["output_throughput"] == 0.5
    assert c8["ratio"]["median_itl_ms"] == 2.0  # latency: moelink/vLLM > 1 is moelink slower
    assert c8["vllm"]["burst_rounds"] == 0
    runs.append({**_served("vllm", 3, 8, 1.0), "median_itl_ms": 0.0, "burst": True})
    assert peer_vllm.summarize_served(runs)[1]["vllm"]["burst_rounds"] == 1
    assert "| completions | 8 | vllm* |" in peer_vllm.format_served(peer_vllm.summarize_served(runs))
    table = peer_vllm.format_served(rows)
    assert "| completions | 8 | moelink/vLLM | 0.50x | 1.00x | 2.00x | 1.00x | 1.00x |" in table
    assert "| completions | 8 | vllm | 819.2 | 38.5 | 6.50 | 8.00 | 25.6 |" in table


def _offline(engine, rnd, b1, full, outputs):
    return {"engine": engine, "round": rnd, "batch1": {"output_tok_s": b1}, "full": {"output_tok_s": full},
            "outputs_batch1": outputs[:1], "outputs_full": outputs}


def test_offline_summary_medians_ratio_and_greedy_comparison():
    same = [[1, 2, 3], [4, 5, 6]]
    runs = [_offline("moelink", 0, 100.0, 400.0, same), _offline("vllm", 0, 150.0, 3000.0, [[1, 2, 3], [4, 9, 9]]),
            _offline("moelink", 1, 120.0, 600.0, same), _offline("vllm", 1, 130.0, 3400.0, same)]
    s = peer_vllm.summarize_offline(runs)
    assert s["batch1"] == {"moelink": 110.0, "vllm": 140.0, "ratio": round(110 / 140, 3)}
    assert s["full"]["ratio"] == round(500 / 3200, 3)
    # Round 0's outputs are the ones compared.
    assert s["greedy"]["batch1"]["identical"] == 1 and s["greedy"]["full"] == {
        "identical": 1, "of": 2, "first_divergence_positions": [1]}
    assert s["greedy"]["all_identical"] is False
    assert "| full | 400, 600 | 3000, 3400 | 500.0 | 3200.0 | 0.16x |" in peer_vllm.format_offline(s, runs)


def test_dry_run_prints_each_engine_alternating_and_the_peer_client(capsys):
    out = peer_vllm.main(["--dry-run", "--rounds", "2", "--concurrency", "1,8,64", "--peer-venv", "/opt/peer",
                          "--served-order", "blocks"])
    cmds = out["commands"]
    offline = [c for c in cmds if "offline_worker.py" in c]
    assert [("--engine vllm" in c) for c in offline] == [False, True, False, True]
    assert all(c.startswith("VLLM_CPU_KVCACHE_SPACE=1 /opt/peer/bin/python") for c in offline if "vllm" in c.split()[3])
    servers = [c for c in cmds if " serve builtin-model" in c]
    assert len(servers) == 4 and "moelink.engine.api.cli serve" in servers[0]
    assert "/opt/peer/bin/vllm serve" in servers[1] and all("--dtype float32" in c for c in servers)
    assert all("--host 127.0.0.1" in c for c in servers)
    every = [c for c in cmds if "/opt/peer/bin/vllm bench serve" in c]
    warmups = [c for c in every if "--save-result" not in c]
    bench = [c for c in every if "--save-result" in c]
    # One untimed warm-up per server (other prompts: seed 1), then each level measured.
    assert len(warmups) == 4 and all("--seed 1 " in c and "--max-concurrency 64" in c for c in warmups)
    assert every.index(warmups[0]) == 0 and every.index(warmups[1]) == 7
    assert len(bench) == 2 * 2 * 3 * 2  # rounds x engines x concurrency x (completions, chat)
    first = bench[0]
    for flag in ("--backend openai ", "--dataset-name random", "--random-input-len 64", "--random-output-len 32",
                 "--ignore-eos", "--temperature 0", "--num-prompts 16", "--max-concurrency 1", "--save-result",
                 "--tokenizer builtin-model"):
        assert flag in first, flag
    assert "--num-prompts 256 --max-concurrency 64" in bench[2]
    assert any("--backend openai-chat" in c and "/v1/chat/completions" in c for c in bench)
    assert "wrote" not in capsys.readouterr().out  # a dry run writes no result


def test_dry_run_interleaved_keeps_both_servers_and_alternates_each_level():
    out = peer_vllm.main(["--dry-run", "--only", "served", "--rounds", "2", "--concurrency", "1,8",
                          "--peer-venv", "/opt/peer"])
    cmds = out["commands"]
    servers = [c for c in cmds if " serve builtin-model" in c]
    assert len(servers) == 2 and "moelink.engine.api.cli serve" in servers[0] and "vllm serve" in servers[1]
    every = [c for c in cmds if "/opt/peer/bin/vllm bench serve" in c]
    warmups = [c for c in every if "--save-result" not in c]
    bench = [c for c in every if "--save-result" in c]
    assert every[:2] == warmups and "127.0.0.1:8000" in warmups[0] and "127.0.0.1:8001" in warmups[1]
    # moelink's port 8000, vLLM's 8001: each level's two runs back to back, vLLM first in round 1
    ports = ["8000" if "127.0.0.1:8000" in c else "8001" for c in bench]
    assert ports == ["8000", "8001"] * 4 + ["8001", "8000"] * 4
    levels = [(c.split("--max-concurrency ")[1].split()[0], "chat" in c) for c in bench]
    assert levels[:8] == [("1", False)] * 2 + [("8", False)] * 2 + [("1", True)] * 2 + [("8", True)] * 2


def test_level_order_pairs_engines_per_level():
    order = peer_vllm.level_order(2, ["completions"], [1, 64])
    assert order == [(0, "completions", 1, "moelink"), (0, "completions", 1, "vllm"),
                     (0, "completions", 64, "moelink"), (0, "completions", 64, "vllm"),
                     (1, "completions", 1, "vllm"), (1, "completions", 1, "moelink"),
                     (1, "completions", 64, "vllm"), (1, "completions", 64, "moelink")]


def test_session_cpu_s_counts_a_session_and_nothing_for_a_missing_one():
    """A process started in a session of its own, as the benchmark starts a server: its CPU is the session's, and
    grows while it computes. (Not the test's own session: other workers' children leave it at any time, taking
    their CPU out of the sum.)"""
    import subprocess
    import sys

    code = ("import sys, time\nsum(i * i for i in range(1_000_000))\nprint('a', flush=True)\n"
            "sys.stdin.readline()\nsum(i * i for i in range(3_000_000))\nprint('b', flush=True)\ntime.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-S", "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "a\n"
        before = peer_vllm.session_cpu_s(proc.pid)  # a new session's id is its leader's pid
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "b\n"
        assert peer_vllm.session_cpu_s(proc.pid) > before > 0
    finally:
        proc.kill()
        proc.wait()
    assert peer_vllm.session_cpu_s(2 ** 22 + 12345) == 0.0  # no such session


def test_engine_order_alternates_and_prompt_counts():
    assert peer_vllm.engine_order(2) == [(0, "moelink"), (0, "vllm"), (1, "moelink"), (1, "vllm")]
    assert [peer_vllm.num_prompts(c) for c in (1, 4, 8, 64)] == [16, 16, 32, 256]


def test_report_recomputes_a_saved_results_summaries(tmp_path, capsys):
    import json

    saved = {"served": {"runs": [_served("moelink", 0, 8, 0.5), _served("vllm", 0, 8, 1.0)], "summary": []}}
    path = tmp_path / "peer.json"
    path.write_text(json.dumps(saved))
    peer_vllm.main(["--report", str(path)])
    assert json.loads(path.read_text())["served"]["summary"][0]["ratio"]["output_throughput"] == 0.5
    assert "| completions | 8 | moelink/vLLM | 0.50x |" in capsys.readouterr().out
