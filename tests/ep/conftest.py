"""Fixtures of the EP tests: a local Ray (ranks are processes, gloo on 127.0.0.1), and a RAY_TMPDIR of one
test's own.

The local Ray is started once and kept for as long as the tests run back to back want it: every module
using `local_ray` gets the same instance while one such module follows another (about 6 s of start and
stop each saved). It is stopped as soon as the next module's first test does not use it (so a test that
starts its own Ray or needs none in this process never sees one left by another module), at the end of the session, and between two modules whenever
the one before did not give every CPU back (a leak never reaches the next module).
"""
from __future__ import annotations

import contextlib
import os
import time

import pytest

from moelink.engine.cluster.rank_pool import RANK_POOL
from tests.helpers import local_ray as ray_helpers

# One-node tests keep Ray, and the ranks' rendezvous, on loopback (servers started here inherit this).
os.environ.setdefault(ray_helpers.LOOPBACK_ENV, "0")
os.environ.setdefault("MOELINK_MASTER_ADDR", "127.0.0.1")

FREE_AGAIN_S = 15.0  # how long a module's Ray may take to get its CPUs back before it is not handed on
# The shared Ray's logical CPUs (one per rank bundle; the machine has 2 real cores either way): 20, so that the
# rank processes parked for reuse (engine/cluster/rank_pool.py) by an engine of every size these modules start
# (2, 3, 4 and 8 ranks: 17) can all wait at once. With 8, a start of another size cleared the parked ones to make
# room, and the next engine of the cleared size started its processes again (~2.5 s of CPU each: importing
# torch, Ray and moelink); a parked process holds ~0.3 GB and no CPU.
SHARED_CPUS = 20


class _SharedRay:
    """tests.helpers.local_ray.local_ray(num_cpus=SHARED_CPUS), entered on first use and left on close()."""

    def __init__(self):
        self._stack: contextlib.ExitStack | None = None
        self.ray = None

    def get(self):
        if self.ray is None:
            stack = contextlib.ExitStack()
            self.ray = stack.enter_context(ray_helpers.local_ray(num_cpus=SHARED_CPUS))
            self._stack = stack
            # The engines on the shared Ray reuse their rank processes (engine/cluster/rank_pool.py): a rank
            # process costs ~1.5 s of CPU to start, most of a small EP engine's start, and these modules start
            # hundreds. Only here: a test of its own Ray sees its ranks go at shutdown, as a user's would.
            RANK_POOL.enabled = os.environ.get("MOELINK_TEST_RANK_POOL", "1") != "0"  # 0: measure without
        return self.ray

    def all_free(self) -> bool:
        """Whether every CPU is back (bounded wait: an engine's actors may still be going away), counting the CPUs
        of the rank processes parked for the next engine (engine/cluster/rank_pool.py) as back: they are ours."""
        ray = self.ray
        deadline = time.monotonic() + FREE_AGAIN_S
        while True:
            try:
                total = ray.cluster_resources().get("CPU", 0)
                if total and ray.available_resources().get("CPU", 0) + RANK_POOL.held_cpus() == total:
                    return True
            except Exception:  # a Ray that cannot answer is not handed on
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def close(self):
        stack, self._stack, self.ray = self._stack, None, None
        RANK_POOL.enabled = False
        RANK_POOL.clear()  # (Ray's shutdown would take them too; cleared first, so no handle outlives it)
        if stack is not None:
            stack.close()


_SHARED = _SharedRay()


@pytest.fixture(scope="session")
def shared_ray():
    """The holder of the Ray that consecutive `local_ray` modules share; stopped at the end of the session."""
    yield _SHARED
    _SHARED.close()


@pytest.fixture(scope="module")
def local_ray(shared_ray):
    """A local Ray for this module (tests.helpers.local_ray.local_ray: own temp dir, 127.0.0.1, SHARED_CPUS CPUs), the
    one the module before used when that one gave every CPU back, else a new one."""
    pytest.importorskip("ray")
    yield shared_ray.get()
    if shared_ray.ray is not None and not shared_ray.all_free():
        shared_ray.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    # After the fixtures' teardown. Within a module the Ray stays up (as the module-scoped fixture always
    # kept it); when the next test is in another module and does not use it (another directory, a test that
    # starts its own Ray or needs none in this process) or there is none, it is stopped now.
    if _SHARED.ray is None:
        return
    if nextitem is None or (nextitem.path != item.path and "shared_ray" not in nextitem.fixturenames):
        _SHARED.close()


@pytest.fixture
def ray_tmpdir():
    """A short RAY_TMPDIR for one test; whatever still uses it at the end is killed (by PID), then removed."""
    with ray_helpers.ray_temp_dir("mlrt-") as path:
        yield path
