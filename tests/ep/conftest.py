"""Fixtures of the EP tests: a local Ray for one module (ranks are processes, gloo on 127.0.0.1), and a
RAY_TMPDIR of one test's own."""
from __future__ import annotations

import os

import pytest

from tests.helpers import local_ray as ray_helpers

# One-node tests keep Ray, and the ranks' rendezvous, on loopback (servers started here inherit this).
os.environ.setdefault(ray_helpers.LOOPBACK_ENV, "0")
os.environ.setdefault("MOELINK_MASTER_ADDR", "127.0.0.1")


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of this module's own (tests.helpers.local_ray.local_ray: own temp dir, 127.0.0.1)."""
    pytest.importorskip("ray")
    with ray_helpers.local_ray(num_cpus=4) as ray:
        yield ray


@pytest.fixture
def ray_tmpdir():
    """A short RAY_TMPDIR for one test; whatever still uses it at the end is killed (by PID), then removed."""
    with ray_helpers.ray_temp_dir("mlrt-") as path:
        yield path
