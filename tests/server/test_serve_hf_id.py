"""`moelink serve ORG/NAME` (a Hugging Face id, from a cache this test builds, hub offline) prints the absolute
tokenizer path benchmark clients need, as it does for a directory (issue 27, item 8): the snapshot directory."""
from __future__ import annotations

import os

import pytest

from tests.helpers.grpc_server import ENGINE_FLAGS, ServerProcess
from tests.helpers.hf_cache import add_snapshot

REPO = "myorg/tiny-moe"


@pytest.mark.slow
def test_serving_a_hub_id_prints_its_snapshot_as_the_tokenizer_path(model_path, tmp_path):
    cache = tmp_path / "hub"
    snap = add_snapshot(cache, REPO, "c" * 40, model_path)
    env = {"HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    srv = ServerProcess(REPO, ENGINE_FLAGS + ["--no-http"], env=env)
    try:
        line = srv.wait_for_line(r"moelink: tokenizer: (\S+)$", 10, "the tokenizer line")
        assert line.group(1) == os.path.abspath(snap)
        assert f"moelink: serving '{REPO}'" in "".join(srv.stdout_lines)  # the name clients use is still the id
    finally:
        srv.close()
