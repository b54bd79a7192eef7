"""The Ray a server starts for itself keeps its files to this user (issue 32, item 6).

Ray makes its temp dir and everything in it 0777 without the sticky bit, so before the fix another local
user could create files and symlinks in the session's sockets/ and logs/. Now Ray's dir lives in a 0700 dir
of moelink's own and is 0700 itself: nobody else can enter either.
"""
from __future__ import annotations

import os
import stat

import pytest

pytestmark = pytest.mark.slow


def test_the_local_ray_dir_is_private():
    pytest.importorskip("ray")
    from moelink.engine.cluster.ray_runtime import LocalRay

    ray = LocalRay(num_cpus=1)
    try:
        temp_dir = ray.temp_dir
        sockets = [os.path.join(root, d) for root, dirs, _ in os.walk(temp_dir) for d in dirs if d == "sockets"]
        assert sockets, os.listdir(temp_dir)
        # Some directory on the way from /tmp to sockets/ must be closed to group and others, and the
        # temp dir itself is 0700.
        assert stat.S_IMODE(os.stat(temp_dir).st_mode) == 0o700, oct(os.stat(temp_dir).st_mode)
        path, closed = sockets[0], []
        while path not in ("/", os.path.dirname(os.path.dirname(temp_dir))):
            mode = stat.S_IMODE(os.stat(path).st_mode)
            closed.append(mode & 0o077 == 0)
            path = os.path.dirname(path)
        assert any(closed), closed
        parent = os.path.dirname(temp_dir)
        assert os.path.basename(parent).startswith("moelink-ray-")
        assert stat.S_IMODE(os.stat(parent).st_mode) == 0o700
    finally:
        ray.close()
    assert not os.path.exists(ray.temp_dir) and not os.path.exists(os.path.dirname(ray.temp_dir))
