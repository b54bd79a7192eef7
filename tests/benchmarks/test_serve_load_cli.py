"""`moelink bench-serve` (issue 14): a run never overwrites the committed results unless --out names them, and
--help shows every flag's default."""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from moelink.benchmarks import serve_load


def _bench_parser() -> argparse.ArgumentParser:
    from moelink.engine.api.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["bench-serve"]


@pytest.mark.parametrize("which", ["moelink bench-serve", "python -m moelink.benchmarks.serve_load"])
def test_help_shows_every_default_and_no_api_key(which, monkeypatch, capsys):
    monkeypatch.setenv("MOELINK_API_KEY", "sk-not-for-help-output")
    if which == "moelink bench-serve":
        parser = _bench_parser()
        parser.print_help()
    else:
        with pytest.raises(SystemExit):
            serve_load.main(["--help"])
        parser = None
    out = capsys.readouterr().out
    text = " ".join(out.split())  # argparse wraps lines
    assert "sk-not-for-help-output" not in text
    # One entry per option: a line starting "  -", then its indented continuation lines.
    entries = {}
    for line in out.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif line.startswith("   ") and entries:
            entries[flag] += " " + line.strip()
    options = [a.option_strings[-1] for a in (parser or _bench_parser())._actions
               if a.option_strings and a.dest != "help"]
    assert set(entries) == set(options) | {"-h"}
    for flag in options:
        assert "(default" in entries[flag], entries[flag]
    for shown in ("(default: 1,4,16,64)", "(default: 20,80,200)", "(default: native)", "(default: 64)",
                  "(default: 250.0)", "(default: $MOELINK_API_KEY, else none)", "(default: False)",
                  "benchmarks/runs/serve_load_<device>_<UTC time>.json, git-ignored"):
        assert shown in text, shown


def test_default_output_is_a_fresh_timestamped_file_outside_the_committed_results(tmp_path, monkeypatch):
    now = datetime(2026, 11, 22, 18, 5, 9, tzinfo=timezone.utc)
    path = serve_load.output_path(None, "cpu (x86_64)", now)
    assert path == serve_load.RUNS_DIR / "serve_load_cpu_20261122T180509Z.json"
    assert serve_load.RESULTS_DIR not in path.parents
    assert serve_load.output_path("benchmarks/results/serve_load_cpu.json", "cpu") == \
        Path("benchmarks/results/serve_load_cpu.json")
    # Two runs in the same second: the second gets its own file.
    monkeypatch.setattr(serve_load, "RUNS_DIR", tmp_path)
    first = serve_load.output_path(None, "cpu", now)
    first.write_text("{}")
    second = serve_load.output_path(None, "cpu", now)
    assert second != first and second.parent == tmp_path and not second.exists()


def test_runs_dir_is_git_ignored():
    root = Path(serve_load.__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    probe = serve_load.RUNS_DIR.relative_to(root) / "serve_load_cpu_20261122T180509Z.json"
    assert subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=root, timeout=30).returncode == 0
    assert subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/serve_load_cpu.json"], cwd=root,
                          timeout=30).returncode == 1


def test_a_run_without_out_leaves_the_committed_results_alone(tmp_path, monkeypatch, capsys):
    """The whole run_from_args path, with the load itself stood in (no server): the file lands in RUNS_DIR."""
    committed = {p: p.stat().st_mtime_ns for p in serve_load.RESULTS_DIR.glob("serve_load_*")}

    async def fake_run_all(ns, target):
        return dict(device="cpu (test)", model=dict(name="m"), levels=[])

    monkeypatch.setattr(serve_load, "_run_all", fake_run_all)
    monkeypatch.setattr(serve_load, "RUNS_DIR", tmp_path / "runs")
    assert serve_load.main(["--target", "127.0.0.1:1", "--no-plot"]) == 0
    written = list((tmp_path / "runs").glob("serve_load_cpu_*.json"))
    assert len(written) == 1 and re.fullmatch(r"serve_load_cpu_\d{8}T\d{6}Z\.json", written[0].name)
    assert f"wrote {written[0]}" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in serve_load.RESULTS_DIR.glob("serve_load_*")} == committed
