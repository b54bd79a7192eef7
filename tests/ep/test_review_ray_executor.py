"""RayExecutor start-up failures leave nothing running (review regression tests)."""
from __future__ import annotations

import pytest

from moelink.engine import EngineArgs


def test_placement_failure_shuts_down_the_ray_it_started(tiny_model, monkeypatch):
    ray = pytest.importorskip("ray")
    import importlib
    import os
    import shutil
    import tempfile

    from moelink.engine.ray_guard import processes_using

    pg_mod = importlib.import_module("ray.util.placement_group")  # ray.util re-exports a function of that name

    from moelink.engine import ray_executor
    from moelink.engine.ray_executor import RayExecutor

    if ray.is_initialized():
        pytest.skip("needs to start its own Ray instance")
    real_pg = pg_mod.placement_group
    # Bundles no node can hold: the placement group never becomes ready.
    monkeypatch.setattr(pg_mod, "placement_group", lambda bundles, **kw: real_pg([{"CPU": 1000}] * len(bundles), **kw))
    monkeypatch.setattr(ray_executor, "_PG_TIMEOUT_S", 2.0)
    cfg = EngineArgs(model=tiny_model("qwen3_e6k3"), dtype="float32", expert_parallel_size=2, executor="ray",
                     num_kv_blocks=32).create_engine_config()
    ray_tmpdir = tempfile.mkdtemp(prefix="mlrt-", dir="/tmp")  # short: Ray's socket paths
    monkeypatch.setenv("RAY_TMPDIR", ray_tmpdir)
    try:
        with pytest.raises(RuntimeError, match="cannot place"):
            RayExecutor(cfg)
        assert not ray.is_initialized(), "the local Ray instance started for this executor was left running"
        # Nothing of it is left either: no process, no session folder (its own temp dir is gone).
        assert not processes_using(ray_tmpdir) and not os.listdir(ray_tmpdir)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
