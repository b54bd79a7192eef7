"""The machine's CPU use through a test run, for finding where the cores stand idle (issue 55).

`MOELINK_TEST_CPU_SAMPLES=FILE make test PYTEST_ARGS=--junitxml=OUT.xml` makes the pytest controller
(tests/helpers/run_records.py) write one line per second to FILE (a new file: a pytest that a test runs, with the
variable inherited, finds it there and samples nothing): the epoch time and the busy cores over that second, from
/proc/stat (every process of the machine: the workers, their Ray ranks, servers and forked children). `python -m
tests.helpers.junit_times OUT.xml --idle FILE` then gives each file the idle core-seconds of the seconds its tests
ran, shared among the tests running at that moment (a test that waits on a subprocess while the other worker runs a
one-core test leaves a core idle: that is what a third worker could fill, or what a shorter wait saves).

A daemon thread reading one /proc file a second: no measurable CPU. Linux only (elsewhere nothing is sampled).
"""
from __future__ import annotations

import os
import threading
import time


def _jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


class Sampler:
    def __init__(self, path: str, every_s: float = 1.0):
        self.path, self.every_s = path, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moelink-cpu-samples", daemon=True)

    def _run(self) -> None:
        cores = os.cpu_count() or 1
        last = _jiffies()
        if last is None:
            return
        try:  # the first sampler of the run owns the file: a pytest a test runs (its env inherited) samples nothing
            out = open(self.path, "x")
        except FileExistsError:
            return
        with out:
            while not self._stop.wait(self.every_s):
                now = _jiffies()
                if now is None:
                    return
                busy, total = now[0] - last[0], now[1] - last[1]
                last = now
                out.write(f"{time.time():.2f}\t{cores * busy / max(total, 1):.3f}\n")
                out.flush()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def start(path: str) -> Sampler:
    sampler = Sampler(path)
    sampler._thread.start()
    return sampler


def read(path: str) -> list[tuple[float, float]]:
    """(epoch, busy cores over the second before it), in order."""
    rows = []
    with open(path, errors="replace") as f:
        for line in f:
            fields = line.replace("\0", "").split()
            if len(fields) == 2:  # a line cut by a crash is skipped
                rows.append((float(fields[0]), float(fields[1])))
    return rows
