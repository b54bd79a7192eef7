"""Where a result came from: every benchmark results JSON (and `moelink plan --json`) records the commit
it measured."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """Short hash of HEAD of the checkout moelink runs from, or "unknown" outside git. MOELINK_COMMIT, when set,
    names it instead (benchmarks/gpu_session.sh sets it: a device machine's copy of .git can be older than the
    working tree it was sent with)."""
    given = os.environ.get("MOELINK_COMMIT", "").strip()
    if given:
        return given
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_result(path: str | Path, result: dict, indent: int = 1) -> Path:
    """Write a benchmark's result JSON (creating its folder) and say where; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=indent) + "\n")
    return out
