"""What an EP engine holds in Ray is given back: on `del`, `with`, shutdown(), clean exit and SIGKILL."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.ray_guard import processes_using

KW = dict(dtype="float32", num_kv_blocks=64, max_num_seqs=4)


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.05)


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


@pytest.fixture
def ray_tmpdir():
    """A short RAY_TMPDIR for one test; whatever still uses it at the end is killed (by PID), then removed."""
    path = tempfile.mkdtemp(prefix="mlrt-", dir="/tmp")
    yield path
    for pid in processes_using(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


def _no_ray_left(path: str) -> bool:
    return not processes_using(path) and not os.listdir(path)


def test_sigkilled_ep_server_leaves_no_ray_behind(tiny_model, ray_tmpdir, listening):
    """`moelink serve -ep 2` starts a private Ray on loopback only; after a SIGKILL of the server it goes
    within seconds (before: every Ray server on all interfaces; agents lived ~65 s, the session folder for good)."""
    env = dict(os.environ, RAY_TMPDIR=ray_tmpdir, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "moelink.engine.cli", "serve", tiny_model("qwen3_e6k3"), "--host", "127.0.0.1",
           "--port", "0", "--expert-parallel-size", "2", "--dtype", "float32", "--num-kv-blocks", "64"]
    log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        deadline = time.monotonic() + 90
        for line in server.stdout:
            if line.startswith("moelink: serving"):
                break
            assert time.monotonic() < deadline, "server not ready within 90 s"
        else:
            log.seek(0)
            raise AssertionError(f"server exited ({server.wait()}):\n{log.read()[-3000:]}")
        ray_pids = processes_using(ray_tmpdir)
        assert ray_pids, "the server's Ray should live under RAY_TMPDIR"
        # GCS, raylet, agents, the rank actors and rank 0's rendezvous store: all on loopback.
        ours = listening(pids=ray_pids)
        assert ours and all(addr == "127.0.0.1" for addr, _ in ours), sorted(ours)
        server.kill()
        server.wait(10)
        t0 = time.monotonic()
        _wait(lambda: _no_ray_left(ray_tmpdir), 10, "the Ray of a SIGKILLed server to be gone")
        print(f"Ray processes and folder gone {time.monotonic() - t0:.2f} s after SIGKILL of the server")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        server.stdout.close()
        log.close()
