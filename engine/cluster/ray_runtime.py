"""What the Ray executor holds in Ray, apart from the executor itself (engine/cluster/ray_executor.py).

- `LocalRay` / `ray_on_loopback`: a Ray instance this process starts for itself (127.0.0.1, a temp dir of
  its own, a guard process that cleans up after a SIGKILLed server);
- `_RayState`: the actors, the placement group and that Ray, released once (shutdown, collection or exit),
  plus the elastic-EP record of a lost rank;
- `_heartbeats`: the thread that pings every rank on its own concurrency group and fails (or, elastic,
  records as lost) a rank that dies or stays silent;
- `bundle_node_ids`: the Ray node of each placement-group bundle.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading

from .executor import WorkerDiedError, rank_name

logger = logging.getLogger("moelink.engine.cluster.ray_executor")  # one logger name for the executor's messages

_PG_TIMEOUT_S = 120.0
_HEARTBEAT_GROUP = "heartbeat"
_HEARTBEAT_INTERVAL_S = 1.0
_GUARD_EXIT_WAIT_S = 15.0
_LOST_POLL_S = 0.25


class ExecutorShutDown(RuntimeError):
    """The executor was shut down while a step was running."""


RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def ray_on_loopback():
    """Make the Ray about to be started a loopback one.

    Ray replaces a node address of 127.0.0.1 by this host's routable address and then binds its
    GCS, raylet and worker servers on every interface, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    ("one-node cluster"; the same setting deploy/ray/start_head.sh uses for --node-ip 127.0.0.1).
    Every Ray process reads it when it imports Ray: the processes started here inherit it from the
    environment, and this process, which imported Ray already, gets its constant set meanwhile.
    """
    old_env = os.environ.get(RAY_LOOPBACK_ENV)
    os.environ[RAY_LOOPBACK_ENV] = "0"
    try:
        from ray._private import ray_constants
    except ImportError:  # a Ray without that module: the environment variable is all we can do
        ray_constants = None
    old_const = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if old_const is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if old_const is not None:
            ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(RAY_LOOPBACK_ENV, None)
        else:
            os.environ[RAY_LOOPBACK_ENV] = old_env


RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"


def quiet_token_auth() -> None:
    """Token authentication for the local Ray about to start, said explicitly: what `ray.init` turns on itself
    for a new local cluster (Ray 2.5x and later), minus the warning it prints at every start when the mode was
    left unset ("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out").
    A mode set in the environment is kept as it is (Ray reads it without a word). Ray's own step, so its cached
    config and the processes it starts agree on the mode."""
    if os.environ.get(RAY_AUTH_MODE_ENV) is not None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # a Ray without token authentication: nothing to say
        return
    _enable_token_auth()


class LocalRay:
    """A Ray instance this process starts for itself, and everything it leaves on disk.

    It lives in a fresh temp dir (under $RAY_TMPDIR, else /tmp: Ray's socket paths must stay
    short) instead of /tmp/ray, binds 127.0.0.1 (all its ranks are on this host), and comes with
    a guard process (`ray_guard.py`) that stops its processes and removes the dir once this
    process is gone, however it went. `close()` shuts Ray down and removes the dir itself.
    """

    def __init__(self, num_cpus: int):
        import ray

        base = os.environ.get("RAY_TMPDIR") or "/tmp"
        # Ray makes its temp dir and everything in it 0777 (no sticky bit): another local user could plant
        # files and symlinks in its sockets/ and logs/. So it lives one level down in a dir of our own, 0700
        # (mkdtemp), which nobody else can enter whatever Ray does inside; made 0700 itself once Ray is up.
        self.private_dir = tempfile.mkdtemp(prefix="moelink-ray-", dir=base)
        self.temp_dir = os.path.join(self.private_dir, "r")
        self.guard: subprocess.Popen | None = None
        self._closed = False
        try:
            from . import ray_guard

            # Started before Ray, so a kill during ray.init is cleaned up too. Its stdin is a pipe only this
            # process holds (close-on-exec: Ray's processes do not inherit it).
            self.guard = subprocess.Popen([sys.executable, ray_guard.__file__, self.private_dir, str(os.getpid())],
                                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
            quiet_token_auth()
            with ray_on_loopback():
                # Ray runs its workers at nice 15; here they are the ranks, the engine's own work: at 15 a busy
                # host (a tokenizer, a neighbour process) starves them past the heartbeat timeout.
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                         _node_ip_address="127.0.0.1", _temp_dir=self.temp_dir,
                         _system_config={"worker_niceness": 0})
            os.chmod(self.temp_dir, 0o700)
            self._name_raylet(ray_guard)
        except BaseException:
            self.close()
            raise
        logger.info("started a local Ray instance in %s (guard pid %d)", self.temp_dir, self.guard.pid)

    def _name_raylet(self, ray_guard) -> None:
        """Tell the guard which process is this instance's raylet, now that Ray is up: it then watches that
        process from this moment, instead of finding it on its own next /proc scan (a raylet killed before that
        scan would never be seen to die, and its workers would live on)."""
        raylet = ray_guard.raylet_of(self.temp_dir, (os.getpid(),))
        if raylet is None or self.guard is None or self.guard.stdin is None:
            return  # the guard keeps looking for it itself
        try:
            self.guard.stdin.write(f"raylet {raylet}\n".encode())
            self.guard.stdin.flush()
        except OSError:
            logger.warning("could not name the raylet (pid %d) to the Ray clean-up guard", raylet)

    def close(self) -> None:
        """Shut Ray down, let the guard sweep up stragglers, remove the temp dir (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # at interpreter exit Ray may be half torn down already
            logger.warning("could not shut the local Ray instance down cleanly", exc_info=True)
        if self.guard is not None:
            try:
                self.guard.stdin.close()  # EOF: the guard cleans up and exits
                self.guard.wait(_GUARD_EXIT_WAIT_S)
            except Exception:
                logger.warning("Ray clean-up guard (pid %d) did not finish; stopping it", self.guard.pid)
                self.guard.kill()
                self.guard.wait(5)
        shutil.rmtree(self.private_dir, ignore_errors=True)


class _RayState:
    """What one RayExecutor holds in Ray, apart from the executor so that the heartbeat thread and the
    finalizer can use it without keeping the executor alive. `release` gives it all back, once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.workers: list = []
        self.spares: list = []  # replacement actors started but not yet admitted (engine/cluster/rejoin.py)
        self.pg = None
        self.local: LocalRay | None = None
        self.connected = False  # we called ray.init (a cluster's address): disconnect on release
        self.dead_error: Exception | None = None
        self.stopping = threading.Event()
        self.released = False
        # Elastic EP: a lost rank is recorded in `lost` (the survivors live on) for the engine to recover from;
        # each recovery starts a new heartbeat generation (the old thread ends).
        self.elastic = False
        self.tp = 1  # ranks per TP group: a loss takes its whole group out, so recovery needs two groups
        self.ep = 1  # expert_parallel_size: with tp, what a lost rank is called (executor.rank_name)
        self.lost: WorkerDiedError | None = None
        self.generation = 0

    def died(self, rank: int, reason: str, what: str = "died") -> WorkerDiedError:
        """The loss of world rank `rank`, named by what it is in this layout (a TP-only server has no
        expert-parallel rank to name)."""
        return WorkerDiedError(rank, reason, what, name=rank_name(rank, self.tp, self.ep))

    def fail(self, error: Exception) -> Exception:
        """Record the first failure, stop every rank; returns the first failure (the one to report). Elastic:
        a lost rank is recorded as `lost` instead and no rank is stopped (engine/cluster/elastic.py decides)."""
        # Recoverable when >= 2 ranks would survive (EP), or >= 1 whole TP group (under TP).
        if self.elastic and isinstance(error, WorkerDiedError) and len(self.workers) >= max(3, 2 * self.tp):
            with self.lock:
                if self.dead_error is None:
                    if self.lost is None:
                        self.lost = error
                        logger.error("%s; elastic EP will recover without it", error)
                    return self.lost
        with self.lock:
            first = self.dead_error is None
            if first:
                self.dead_error = error
        if first and not isinstance(error, ExecutorShutDown):
            logger.error("%s; stopping the other ranks", error)
        self.kill_workers()
        return self.dead_error

    def kill_workers(self) -> None:
        import ray

        for w in list(self.workers) + list(self.spares):
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already gone, or Ray is down
                pass

    def kill_spares(self) -> None:
        """Kill the replacements not admitted (a parked engine keeps only its group's ranks; rank_pool.py)."""
        import ray

        spares, self.spares = list(self.spares), []
        for w in spares:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already gone, or Ray is down
                pass

    def release(self) -> None:
        with self.lock:
            if self.released:
                return
            self.released = True
            if self.dead_error is None:
                self.dead_error = ExecutorShutDown("the Ray executor was shut down")
        self.stopping.set()
        try:
            import ray

            if ray.is_initialized():
                self.kill_workers()
                if self.pg is not None:
                    ray.util.remove_placement_group(self.pg)
        except Exception:
            logger.warning("could not release the Ray workers cleanly", exc_info=True)
        self.workers = []
        self.spares = []
        self.pg = None
        if self.local is not None:
            self.local.close()
        elif self.connected:
            try:
                import ray

                ray.shutdown()
            except Exception:
                pass


def _heartbeats(state: _RayState, interval_s: float, timeout_s: float, generation: int = 0) -> None:
    """Ping every rank each `interval_s`; a rank silent for `timeout_s`, or dead, fails the executor."""
    import ray

    while not state.stopping.wait(interval_s):
        workers = list(state.workers)
        if state.lost is not None or state.generation != generation:
            return  # elastic: a rank is lost; the recovery starts the next generation's thread
        if not workers or state.dead_error is not None or not ray.is_initialized():
            return  # released, failed, or Ray shut down under us (interpreter exit)
        try:
            refs = [w.heartbeat.options(concurrency_group=_HEARTBEAT_GROUP).remote() for w in workers]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        except Exception:
            if state.stopping.is_set():
                return
            logger.warning("heartbeat round failed", exc_info=True)
            continue
        if state.stopping.is_set() or state.dead_error is not None or state.generation != generation:
            return
        answered = set(ready)
        for rank, ref in enumerate(refs):
            if ref not in answered:
                state.fail(state.died(
                    rank, f"no heartbeat for {timeout_s:g} s: its process is frozen, wedged or unreachable "
                          "(--heartbeat-timeout)", what="is not responding"))
                return
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError as exc:
                state.fail(state.died(rank, f"its actor died ({type(exc).__name__})"))
                return
            except Exception:  # a heartbeat cannot raise; count it as an answer
                pass


def bundle_node_ids(pg, count: int) -> list[str]:
    """The Ray node id of each of the first `count` bundles of a ready placement group (bundle r is rank r)."""
    import ray

    by_bundle = ray.util.placement_group_table(pg)["bundles_to_node_id"]
    return [by_bundle[r] for r in range(count)]
