"""A local Ray instance for the EP tests of one module (ranks are processes, gloo on 127.0.0.1)."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# One-node tests keep Ray on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MOELINK_MASTER_ADDR", "127.0.0.1")


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    temp_dir = None
    if not ray.is_initialized():
        # A temp dir of its own (short: Ray's socket paths), removed afterwards: no /tmp/ray sessions pile up.
        temp_dir = tempfile.mkdtemp(prefix="mlray-", dir="/tmp")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", _temp_dir=temp_dir)
    yield ray
    ray.shutdown()
    if temp_dir is not None:
        shutil.rmtree(temp_dir, ignore_errors=True)
