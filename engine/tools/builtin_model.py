"""The built-in model: where it lives and what to say about it.

builtin-model/ (committed beside the code, made by `moelink train-builtin-model`, train_builtin.py) is what
`make serve` serves. Its directory carries `moelink_builtin.json`, the training run's record; a directory
with that file is a built-in model (the committed one or a retrained copy), and the server's start-up banner
says what it is, so nobody mistakes its output for a real model's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

# The repository root is the `moelink` package, so the committed model sits one level above engine/.
BUILTIN_MODEL_DIR = Path(__file__).resolve().parents[2] / "builtin-model"  # the repository root
MARKER_FILE = "moelink_builtin.json"
RETRAIN_COMMAND = "moelink train-builtin-model builtin-model"
DESCRIPTION = ("a tiny MoE trained on the Python standard library's docstrings, for trying the API: "
               "it writes English-like words and is not a useful assistant")


def read_record(model_dir: Union[str, Path, None]) -> Optional[dict]:
    """The training record of a built-in model directory; None for any other model (or an unreadable one)."""
    if model_dir is None:
        return None
    try:
        record = json.loads((Path(model_dir) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe(model_dir: Union[str, Path, None]) -> Optional[str]:
    """One line for the server's banner about a built-in model directory; None for any other model."""
    record = read_record(model_dir)
    if record is None:
        return None
    try:
        params = f"{record['parameters'] / 1e6:.1f}M parameters"
        how = (f"trained on CPU ({record['config']['steps']} steps) on the docstrings of Python {record['python']}'s "
               f"standard library")
    except (KeyError, TypeError):
        return f"built-in model: {DESCRIPTION}"
    return (f"built-in model: a tiny MoE ({params}, Qwen3-MoE layout) {how}, for trying the API: it writes "
            f"English-like words and is not a useful assistant (retrain: {RETRAIN_COMMAND})")
