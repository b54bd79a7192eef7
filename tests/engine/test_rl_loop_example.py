"""examples/rl_loop.py runs as written: a trainer process broadcasts perturbed weights to the engine through a gloo
group for two steps, and the engine's prompt logprobs of its own rollouts equal the trainer's forward at each step
(the example returns 1 otherwise). Its `main` runs in this process (the engine side as the script's would, without a
second interpreter importing torch and transformers again); its trainer is the spawned process it always is."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a spawned trainer process, a model each side: about 8 s
def test_rl_loop_example_matches_the_trainer_at_every_step(monkeypatch, capsys):
    # The examples folder on sys.path: the spawned trainer imports `rl_loop.trainer` by name (spawn passes sys.path).
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    rl_loop = importlib.import_module("rl_loop")
    assert Path(rl_loop.__file__).resolve() == ROOT / "examples" / "rl_loop.py"
    rc = rl_loop.main(["--steps", "2", "--prompts", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out[-2000:]
    assert "step 1: weights  step-1" in out and "all steps matched" in out
