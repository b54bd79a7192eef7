"""examples/rl_loop.py runs as written: a trainer process broadcasts perturbed weights to the engine through a gloo
group for two steps, and the engine's prompt logprobs of its own rollouts equal the trainer's forward at each step
(the example exits 1 otherwise)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two processes, a model each: about 15 s
def test_rl_loop_example_matches_the_trainer_at_every_step():
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "rl_loop.py"), "--steps", "2", "--prompts", "2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "step 1: weights  step-1" in run.stdout and "all steps matched" in run.stdout
