"""The suite's records of what it cost, a pytest plugin (tests/conftest.py loads it): each test's CPU in its pytest
process and, with MOELINK_TEST_CGROUPS=1, of its worker's whole process tree (junit properties `cpu_s`,
`tree_cpu_s`, read by tests/helpers/junit_times.py), each test's start and worker (for the CPU sampler of
MOELINK_TEST_CPU_SAMPLES, tests/helpers/cpu_samples.py), and the run's last lines: rank processes started and
reused, `python -m` children forked and exec'd."""
from __future__ import annotations

import os
import time

import pytest

from tests.helpers import cpu_samples_tree

_CPU_AT_SETUP = pytest.StashKey[float]()
_SAMPLER = pytest.StashKey[object]()
_TREE_CPU_AT_SETUP = pytest.StashKey[float]()

_RANK_STARTS = [0, 0]  # (started, reused) summed over the xdist workers (their counts arrive as each ends)
_PY_STARTS = [0, 0]  # `python -m` children of the tests: (forked by the zygote, exec'd), tests/helpers/zygote.py


def _py_counts() -> tuple[int, int]:
    import sys

    z = sys.modules.get("tests.helpers.zygote")
    return (0, 0) if z is None else (z.starts["zygote"], z.starts["exec"])


def _rank_counts() -> tuple[int, int]:
    import sys

    pool = sys.modules.get("moelink.engine.cluster.rank_pool")
    return (0, 0) if pool is None else (pool.RANK_POOL.starts_fresh, pool.RANK_POOL.starts_saved)


# Each test's CPU in its pytest process (every thread; not its children), beside the wall time junit already keeps:
# `make test PYTEST_ARGS=--junitxml=OUT.xml` then gives both per test (property cpu_s), so a test slowed by something
# beside it (a worker left on two threads, a spinning thread) shows as wall far over CPU, or CPU far over its cost
# alone, and tests/helpers/junit_times.py sums them per file.
# Each test also gets its start (epoch seconds) and worker, so that a run sampled by tests/helpers/cpu_samples.py
# (MOELINK_TEST_CPU_SAMPLES=FILE) can say which tests ran while the cores stood idle (junit_times --idle FILE).
# With MOELINK_TEST_CGROUPS=1 (root, cgroup v1 `cpuacct`) each xdist worker runs in its own cgroup, so each test also
# gets `tree_cpu_s`: the CPU of every process of its worker's tree in its time (its servers, Ray daemons and ranks,
# forked children), which `cpu_s` misses; junit_times shows it as a column.
@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_CPU_AT_SETUP] = time.process_time()
    if cpu_samples_tree.active():
        item.stash[_TREE_CPU_AT_SETUP] = cpu_samples_tree.usage()
    item.user_properties.append(("t0", round(time.time(), 2)))
    item.user_properties.append(("worker", os.environ.get("PYTEST_XDIST_WORKER", "main")))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    if call.when == "teardown" and _CPU_AT_SETUP in item.stash:
        item.user_properties.append(("cpu_s", round(time.process_time() - item.stash[_CPU_AT_SETUP], 3)))
        if _TREE_CPU_AT_SETUP in item.stash:
            item.user_properties.append(("tree_cpu_s", round(cpu_samples_tree.usage() - item.stash[_TREE_CPU_AT_SETUP], 3)))
    yield


def pytest_configure(config):
    if os.environ.get("MOELINK_TEST_CGROUPS") == "1" and hasattr(config, "workerinput"):
        cpu_samples_tree.enter(f"moelink_test_{config.workerinput['workerid']}_{os.getpid()}")


def pytest_sessionstart(session):
    path = os.environ.get("MOELINK_TEST_CPU_SAMPLES")
    if path and not hasattr(session.config, "workerinput"):  # the controller (or a run without workers) samples
        from tests.helpers import cpu_samples

        session.config.stash[_SAMPLER] = cpu_samples.start(path)


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand its counts to the controller
        workeroutput["rank_starts"] = list(_rank_counts())
        workeroutput["py_starts"] = list(_py_counts())
    sampler = session.config.stash.get(_SAMPLER, None)
    if sampler is not None:
        sampler.stop()


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent under -p no:xdist
def pytest_testnodedown(node, error):
    counts = getattr(node, "workeroutput", {}).get("rank_starts")
    if counts:
        _RANK_STARTS[0] += counts[0]
        _RANK_STARTS[1] += counts[1]
    py = getattr(node, "workeroutput", {}).get("py_starts")
    if py:
        _PY_STARTS[0] += py[0]
        _PY_STARTS[1] += py[1]


def pytest_terminal_summary(terminalreporter):
    """How many rank processes the Ray executors started, and how many engine starts took parked ones instead
    (engine/cluster/rank_pool.py, issue 55): the suite's cost is mostly process starts."""
    fresh, saved = (a + b for a, b in zip(_RANK_STARTS, _rank_counts()))
    if fresh or saved:
        terminalreporter.write_line(f"rank processes: {fresh} started, {saved} reused (engine/cluster/rank_pool.py)")
    forked, execd = (a + b for a, b in zip(_PY_STARTS, _py_counts()))
    if forked or execd:
        terminalreporter.write_line(f"python -m children: {forked} forked by the zygote, {execd} exec'd "
                                    f"(tests/helpers/zygote.py)")
