"""Fixtures for the comm tests: launch EP ranks as real processes (gloo on 127.0.0.1, a free port).

Each launch runs tests/helpers/ep_worker.py (`python -m tests.helpers.ep_worker`) once per rank
(several groups may run at once, to save wall time), bounded by a timeout, and always kills whatever
it started.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import zygote

ROOT = Path(__file__).resolve().parents[2]  # on the ranks' sys.path, for `tests.helpers`


class _Launch:
    """One group's ranks, started at once; `finish` waits (bounded), kills leftovers and reads results."""

    def __init__(self, workdir: Path, world_size: int, scenarios=None, mode: str = "run", ranks=None):
        from moelink.comm import find_free_port

        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.ranks = list(range(world_size)) if ranks is None else ranks
        scenario_file = workdir / "scenarios.pt"
        torch.save(scenarios or [], scenario_file)
        port = find_free_port("127.0.0.1")
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        self.procs, self.logs = [], []
        try:
            for r in self.ranks:
                log = open(workdir / f"rank{r}.log", "w")
                self.logs.append(log)
                self.procs.append(zygote.popen(  # forked from the test zygote (torch imported once), else exec'd
                    [sys.executable, "-m", "tests.helpers.ep_worker", str(scenario_file), str(r), str(world_size), str(port),
                     str(workdir), mode], stdout=log, stderr=subprocess.STDOUT, env=env))
        except BaseException:
            self.kill()
            raise

    def kill(self) -> list[int]:
        left = [r for r, p in zip(self.ranks, self.procs) if p.poll() is None]
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()
        return left

    def finish(self, deadline: float) -> list:
        try:
            for p in self.procs:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            timed_out = self.kill()
        wd, ranks = self.workdir, self.ranks
        errors = [r for r in ranks if (wd / f"rank{r}.err").exists()]
        if timed_out or errors or any(not (wd / f"rank{r}.pt").exists() for r in ranks):
            logs = "\n".join(f"--- rank {r} ---\n{(wd / f'rank{r}.log').read_text()[-3000:]}" for r in ranks)
            pytest.fail(f"EP ranks failed (timed out: {timed_out}, errors in ranks {errors}):\n{logs}")
        return [torch.load(wd / f"rank{r}.pt", weights_only=False) for r in ranks]


@pytest.fixture(scope="session")
def ep_launch(tmp_path_factory):
    """ep_launch(spec, ..., timeout_s=90) → one list of per-rank results per spec, the groups running at once.

    A spec is a dict: world_size, and optionally scenarios, mode ("run", "layer", "die", "stall", "lonely"), ranks.
    """
    counter = iter(range(10**6))

    def launch(*specs, timeout_s=90.0):
        launches = []
        try:
            for spec in specs:
                workdir = tmp_path_factory.mktemp(f"ep{spec['world_size']}_{spec.get('mode', 'run')}_{next(counter)}")
                launches.append(_Launch(workdir, **spec))
            deadline = time.monotonic() + timeout_s
            return [launch.finish(deadline) for launch in launches]
        finally:
            for launch in launches:
                launch.kill()

    return launch
