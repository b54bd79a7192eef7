"""What an EP engine holds in Ray is given back: on `del`, `with`, shutdown(), clean exit, SIGKILL, and
a start-up that fails (placement) leaves nothing running."""
from __future__ import annotations

import os
import time

import pytest

from moelink.engine import LLM, EngineArgs, SamplingParams
from moelink.engine.cluster.ray_guard import processes_using

from tests.helpers import zygote_ray
from tests.helpers.grpc_server import ServerProcess
from tests.helpers.waits import wait_until

pytestmark = pytest.mark.slow
COLLECTOR_CHECKED = True  # `del llm` gives the actors back: no heap held frozen here (tests/conftest.py)

KW = dict(dtype="float32", num_kv_blocks=64, max_num_seqs=4)


@pytest.fixture
def local_ray(shared_ray):
    """The shared Ray (tests/ep/conftest.py: the one the module before left, if it did) for one test only, then
    stopped: the other tests here start (and check) Rays of their own. Without the rank pool the shared Ray turns
    on (engine/cluster/rank_pool.py): what is checked here is that a user's LLM gives its processes back."""
    pytest.importorskip("ray")
    from moelink.engine.cluster.rank_pool import RANK_POOL

    try:
        ray = shared_ray.get()
        RANK_POOL.enabled = False
        RANK_POOL.clear()
        yield ray
    finally:
        shared_ray.close()


def _wait(pred, timeout: float, what: str):
    # Ray's resources and /proc: other processes' state, polled.
    wait_until(pred, timeout, what)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_llm_gives_its_ray_workers_back(local_ray, tiny_model, listening):
    """Two EP-2 LLMs one after the other in one process: `del`, `with` and shutdown() release the actors
    and the placement group at once (before: the second LLM waited 120 s for bundles and failed)."""
    ray = local_ray
    path = tiny_model("qwen3_e6k3")
    cpus = ray.cluster_resources()["CPU"]
    free_again = lambda: ray.available_resources().get("CPU", 0) == cpus  # noqa: E731
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    llm = LLM(path, expert_parallel_size=2, **KW)
    ex = llm.engine.executor
    # The rendezvous store of rank 0 listens on the group's address only, never on every interface.
    assert listening(ex.master_port) == {("127.0.0.1", ex.master_port)}
    pids = list(ex.rank_pids)
    want = [o.outputs[0].token_ids for o in llm.generate([[5, 6, 7]], params, use_tqdm=False)]
    del llm, ex
    _wait(free_again, 10, "the bundles of a deleted LLM to be free")
    _wait(lambda: all(_gone(p) for p in pids), 10, "the rank processes of a deleted LLM to exit")

    with LLM(path, expert_parallel_size=2, **KW) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate([[5, 6, 7]], params, use_tqdm=False)] == want
        pids = list(llm.engine.executor.rank_pids)
    _wait(free_again, 10, "the bundles of an LLM used in `with` to be free")
    _wait(lambda: all(_gone(p) for p in pids), 10, "the rank processes of an LLM used in `with` to exit")
    llm.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[1, 2]], params, use_tqdm=False)


def _no_ray_left(path: str) -> bool:
    return not processes_using(path) and not os.listdir(path)


def test_sigkilled_ep_server_leaves_no_ray_behind(tiny_model, ray_tmpdir, listening):
    """`moelink serve -ep 2` starts a private Ray on loopback only; after a SIGKILL of the server it goes
    within seconds (before: every Ray server on all interfaces; agents lived ~65 s, the session folder for good)."""
    # (ServerProcess: `moelink serve --host 127.0.0.1 --port 0`, OMP_NUM_THREADS=1, ready within 90 s.)
    server = ServerProcess(tiny_model("qwen3_e6k3"), ["--expert-parallel-size", "2", "--dtype", "float32",
                                                      "--num-kv-blocks", "64"],
                           # its Ray's workers (the ranks) fork from the test zygote (tests/helpers/zygote_ray.py)
                           env=zygote_ray.node_env({"RAY_TMPDIR": ray_tmpdir}))
    try:
        # Issue 54 item 10: Ray's token-auth warning at every start, and its record mark on every log line.
        logs = server.logs()
        assert "Token authentication" not in logs and "_ray_timestamp_ns" not in logs, logs[-3000:]
        assert "started a local Ray instance" in logs  # a line of ours logged with Ray imported
        ray_pids = processes_using(ray_tmpdir)
        assert ray_pids, "the server's Ray should live under RAY_TMPDIR"
        # GCS, raylet, agents, the rank actors and rank 0's rendezvous store: all on loopback.
        ours = listening(pids=ray_pids)
        assert ours and all(addr == "127.0.0.1" for addr, _ in ours), sorted(ours)
        server.kill()
        t0 = time.monotonic()
        _wait(lambda: _no_ray_left(ray_tmpdir), 10, "the Ray of a SIGKILLed server to be gone")
        print(f"Ray processes and folder gone {time.monotonic() - t0:.2f} s after SIGKILL of the server")
    finally:
        server.kill()
        server.close()


def test_placement_failure_shuts_down_the_ray_it_started(tiny_model, monkeypatch, ray_tmpdir):
    """RayExecutor start-up failures leave nothing running."""
    ray = pytest.importorskip("ray")
    import importlib

    pg_mod = importlib.import_module("ray.util.placement_group")  # ray.util re-exports a function of that name

    from moelink.engine.cluster import ray_executor
    from moelink.engine.cluster.ray_executor import RayExecutor

    if ray.is_initialized():
        pytest.skip("needs to start its own Ray instance")
    real_pg = pg_mod.placement_group
    # Bundles no node can hold: the placement group never becomes ready.
    monkeypatch.setattr(pg_mod, "placement_group", lambda bundles, **kw: real_pg([{"CPU": 1000}] * len(bundles), **kw))
    monkeypatch.setattr(ray_executor, "_PG_TIMEOUT_S", 1.0)
    cfg = EngineArgs(model=tiny_model("qwen3_e6k3"), dtype="float32", expert_parallel_size=2, executor="ray",
                     num_kv_blocks=32).create_engine_config()
    monkeypatch.setenv("RAY_TMPDIR", ray_tmpdir)  # the executor's own Ray makes its temp dir in there
    try:
        with pytest.raises(RuntimeError, match="cannot place"):
            RayExecutor(cfg)
        assert not ray.is_initialized(), "the local Ray instance started for this executor was left running"
        # Nothing of it is left either: no process, no session folder (its own temp dir is gone).
        assert not processes_using(ray_tmpdir) and not os.listdir(ray_tmpdir)
    finally:
        if ray.is_initialized():
            ray.shutdown()
