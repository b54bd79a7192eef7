"""Grammar compiles, bounded: their own worker processes and queue, a size and a time limit, cancellation.

Why: a compile is the one piece of a request's intake whose cost a client chooses (a nested 22 KB schema
takes tens of seconds), and nothing else may wait on it. So:
- Each compile worker is a thread that owns one child process (engine/core/grammar_child.py, niced) and runs
  one compile there at a time; `GrammarConfig.workers` of them. No compile runs in this process: it never
  holds the engine thread's GIL, and tokenization (asyncio's default executor, the server's threads) never
  queues behind one. The children are forked by one fork server that has xgrammar imported
  (engine/core/grammar_forks.py): a killed compile's successor is ready in milliseconds, not seconds.
- Specs wait in one FIFO of at most `max_queued`; a spec beyond that is refused (GrammarQueueFull, answered
  RESOURCE_EXHAUSTED: retry later), as is a spec longer than `max_spec_chars` (ValueError naming the field).
- A compile that runs past `timeout_s` ends (its process is killed and replaced) with a ValueError naming
  the field and the limit.
- Equal specs share one compile. Every caller holds its compile through `wait`/`wait_async`; when the last
  one leaves (a client that disconnected cancels its handler), a queued compile is dropped and a running
  one is killed: nothing runs for a client that is gone. A compile whose worker still waits for its process
  to start is dropped without killing that process (a start takes seconds: a flood of hang-ups must not keep
  every start from finishing). `counts` says what became of each spec (the server's metrics show it).
- `shutdown` kills the processes and waits for nothing (SIGTERM's grace is for requests, not compiles).
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Iterable, Optional

from ..config.grammar_config import GrammarConfig
from .grammar_forks import ForkServer, Forked, supported as forks_supported
from ..contract.safe_text import shown
from ..contract.structured_output_params import PREFIX, StructuredOutputParams

if TYPE_CHECKING:
    import xgrammar as xgr  # imported where used: seconds, the first time

logger = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 256 << 20  # the compiled grammars this process keeps (by spec), and each child's xgrammar cache
# A child that does not start within this long (importing xgrammar takes seconds) is a broken install.
CHILD_START_TIMEOUT_S = 120.0


class GrammarQueueFull(Exception):
    """Too many grammar compiles wait already: the request is refused for now (RESOURCE_EXHAUSTED)."""


class _Killed(Exception):
    """The job's child process was killed (its callers left, or shutdown)."""


class _TimedOut(ValueError):
    """A compile ran past the time limit (a ValueError naming the field, counted apart)."""


@dataclass(eq=False)
class _Job:
    key: tuple[str, str]
    params: StructuredOutputParams
    future: Future
    waiters: int = 1
    worker: Optional["_Worker"] = None  # set while it runs (its worker may still wait for its process to start)


_Child = Forked | subprocess.Popen  # a compile process


class _Worker:
    """One compile thread and the child process it talks to (started on its first job, replaced once killed)."""

    def __init__(self, pool: "GrammarCompilerPool", index: int):
        self.pool = pool
        self.proc: Optional[_Child] = None  # a grammar_forks.Forked (or a subprocess.Popen without pidfds)
        self.conn: Optional[Connection] = None
        self.job: Optional[_Job] = None
        self.warm = False  # the child has answered once (its start-up is behind it)
        self.compiling = False  # the current job was sent to the child (under the pool's lock): killing it ends it
        self.spare: Optional[tuple[_Child, Connection]] = None  # started, idle until the current one dies
        self.thread = threading.Thread(target=pool._run_worker, args=(self,), name=f"grammar-{index}", daemon=True)

    def start_child(self) -> None:
        """Make the spare process the current one and start a new spare: a killed compile's successor starts
        at once instead of after the seconds a new process takes to import xgrammar."""
        spare = self.spare
        promoted = spare is not None
        if spare is None:
            spare = self._spawn()
        (self.proc, self.conn), self.spare = spare, None
        self.warm = False
        if promoted:
            # The promoted spare has been starting for a while: its successor starts now, so that the next kill
            # (the next client that hangs up) finds one started too.
            self.spare = self._spawn()
        # Else the next spare is started once this one is ready: two starts at once slow both.

    def _spawn(self) -> tuple[_Child, Connection]:
        """(process, socket) of a new compile process: forked (grammar_forks.py), or started here without pidfds."""
        if self.pool._forks is not None:
            return self.pool._forks.fork()
        parent_sock, child_sock = socket.socketpair()
        # The child imports moelink the way this process did (a checkout on sys.path, or the installed package).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moelink.engine.core.grammar_child", str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, env=env)
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        # After the start: building the info here (importing xgrammar, the first time) overlaps the child's imports.
        conn.send_bytes(self.pool._tokenizer_info_json().encode())
        return proc, conn

    def run(self, job: _Job, timeout_s: float) -> str:
        """The compiled grammar's JSON (this worker's thread only); ValueError(reason) when it does not compile,
        TimeoutError past the limit, _Killed when the process was killed meanwhile (`kill`), or the job was
        dropped while the process started."""
        kind, spec = job.key
        if self.proc is not None and self.proc.poll() is not None:
            self.close()  # killed between two jobs (its last job's clients left as it finished)
        if self.proc is None:
            self.start_child()
        if not self.warm:
            # The child's start (importing xgrammar: seconds) is not the spec's fault: not on its clock.
            try:
                ready = self.conn.poll(CHILD_START_TIMEOUT_S) and self.conn.recv_bytes() == b"ready"
            except (EOFError, OSError):
                ready = False
            if not ready:
                self.close()
                if self.pool._closed:  # killed by shutdown
                    raise _Killed
                raise RuntimeError(f"the grammar compile process did not start within {CHILD_START_TIMEOUT_S:g} s "
                                   "(its log is the server's stderr)")
            self.warm = True
            if self.spare is None:
                self.spare = self._spawn()
        with self.pool._lock:
            if job.future.cancelled():  # its clients left while the process started (`release`)
                raise _Killed
            self.compiling = True  # from here `release` kills the process to end the compile
        try:
            self.conn.send_bytes(json.dumps([kind, spec]).encode())
            answered = self.conn.poll(timeout_s)
            if answered:
                status, value = json.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            self.close()
            raise _Killed from None
        if not answered:
            self.close()  # kills it: the only way to stop a compile
            raise TimeoutError
        if status != "ok":
            raise ValueError(value)
        return value

    def kill(self) -> None:
        """End the child now; any thread may call it (the pool does, holding its lock). The compile waiting on
        it reads EOF, and this worker's thread cleans up (`close`)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def close(self, spare: bool = False) -> None:
        """Close the socket and reap the child (this worker's thread, or shutdown once the thread ended); the
        spare too when `spare`."""
        procs = [(self.proc, self.conn)] + ([self.spare] if spare and self.spare is not None else [])
        self.proc = self.conn = None
        self.warm = False
        if spare:
            self.spare = None
        for proc, conn in procs:
            if conn is not None:
                conn.close()
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                try:
                    proc.wait(5)  # a killed process exits at once
                except subprocess.TimeoutExpired:
                    pass


class GrammarCompilerPool:
    """Compiles specs in child processes (module docstring); compiled grammars come back for this process's
    matchers. The xgrammar tokenizer info is built once, lazily."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int],
                 config: GrammarConfig | None = None):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.config = config or GrammarConfig()
        self._lock = threading.Condition()  # the queue, the shared-compile table, the workers' jobs
        self._queue: collections.deque[_Job] = collections.deque()
        self._jobs: dict[tuple[str, str], _Job] = {}  # queued or running, by key (equal specs share one)
        self._done: collections.OrderedDict[tuple[str, str], xgr.CompiledGrammar] = collections.OrderedDict()  # LRU
        self._done_bytes = 0
        self._workers: list[_Worker] = []
        self._closed = False
        self._info_lock = threading.Lock()
        self._info = None
        self._info_json: Optional[str] = None
        self._local = threading.local()  # the worker a compile thread owns
        self._forks = ForkServer(self._tokenizer_info_json, CHILD_START_TIMEOUT_S) if forks_supported() else None
        # What became of the specs submitted: compiled, failed (did not compile), timed_out, abandoned_queued /
        # abandoned_starting / abandoned_running (every client left), refused_full, refused_too_long.
        self.counts: collections.Counter[str] = collections.Counter()

    # -- the tokenizer info, shared with every child ---------------------------------------------------------
    def tokenizer_info(self):
        with self._info_lock:
            if self._info is None:
                import xgrammar as xgr
                from transformers import PreTrainedTokenizerFast

                # moelink's Tokenizer wraps a `tokenizers` object; xgrammar reads the vocabulary kind
                # (byte-level BPE for the built-in tokenizer) from a transformers fast tokenizer over it.
                hf = PreTrainedTokenizerFast(tokenizer_object=self._tokenizer._tok)
                self._info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                                stop_token_ids=self.stop_token_ids)
            return self._info

    def _tokenizer_info_json(self) -> str:
        # Serialized once (100+ KB, under the GIL): every process start after a kill would pay it again.
        info = self.tokenizer_info()
        with self._info_lock:
            if self._info_json is None:
                self._info_json = info.serialize_json()
            return self._info_json

    # -- callers ---------------------------------------------------------------------------------------------
    def submit(self, params: StructuredOutputParams) -> _Job:
        """Queue `params`' compile (or join an equal one); the caller must `wait`/`wait_async` on the job, which
        releases it. Raises ValueError for a spec over the size limit, GrammarQueueFull when the queue is full."""
        key = params.key
        cfg = self.config
        if len(key[1]) > cfg.max_spec_chars:
            self.counts["refused_too_long"] += 1
            raise ValueError(f"{PREFIX}{params.kind}={shown(key[1])} is too long: {len(key[1])} characters, at most "
                             f"{cfg.max_spec_chars} (max_grammar_chars).")
        with self._lock:
            if self._closed:
                raise RuntimeError("the grammar compiler is shut down")
            done = self._done.get(key)
            if done is not None:
                self._done.move_to_end(key)
                fut = Future()
                fut.set_result(done)
                return _Job(key, params, fut, waiters=1)
            job = self._jobs.get(key)
            if job is not None:
                job.waiters += 1
                return job
            if len(self._queue) >= cfg.max_queued:
                self.counts["refused_full"] += 1
                raise GrammarQueueFull(f"{len(self._queue)} grammar compiles are waiting already (at most "
                                       f"{cfg.max_queued}, max_queued_grammar_compiles): retry later.")
            job = self._jobs[key] = _Job(key, params, Future())
            self._queue.append(job)
            self._add_workers(min(cfg.workers, len(self._queue) + self._running()))
            self._lock.notify()
        return job

    def prestart(self) -> None:
        """Start every compile process now, in the background (a server does, so that its first constrained
        request does not wait seconds for one to start); without xgrammar, nothing."""
        import importlib.util

        if importlib.util.find_spec("xgrammar") is None:
            return
        with self._lock:
            if not self._closed:
                self._add_workers(self.config.workers)

    def warm(self, timeout_s: float) -> Optional[str]:
        """Start the compile processes and run one small compile through the whole path (the fork server and a
        child up, xgrammar imported and its tokenizer info built here, a matcher made), so that a server's first
        constrained request pays only its own schema's compile: a router waits seconds at most for a prefill's
        first answer (issue 54: the managed gateway's, engine/server/gateway/quirks.py
        prefill_leg_without_grammar). Blocks up to `timeout_s`; returns why it could not (a broken install, a start
        past the limit: the server starts anyway, and says so), else None.
        Without xgrammar, nothing to warm."""
        import importlib.util

        if importlib.util.find_spec("xgrammar") is None:
            return None
        self.prestart()
        probe = StructuredOutputParams(json=json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}}))
        job = self.submit(probe)
        try:
            compiled = job.future.result(timeout=timeout_s)
            import xgrammar as xgr

            xgr.GrammarMatcher(compiled)  # the engine's first matcher: what it imports and builds once
        except Exception as exc:  # TimeoutError, a compile that failed: reported, never fatal
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        finally:
            self.release(job)
        return None

    def _add_workers(self, n: int) -> None:
        while len(self._workers) < n:  # holding the lock
            w = _Worker(self, len(self._workers))
            self._workers.append(w)
            w.thread.start()

    def compile(self, params: StructuredOutputParams):
        """The compiled grammar; waits (call it off the engine loop). Raises ValueError naming the field when the
        spec is too long, does not compile or takes longer than the time limit."""
        return self.wait(self.submit(params))

    def wait(self, job: _Job):
        try:
            return job.future.result()
        except CancelledError:
            raise ValueError(self._error(job.params, "its compile was cancelled")) from None
        finally:
            self.release(job)

    async def wait_async(self, job: _Job):
        """`wait` for an event loop: a caller cancelled here (its client left) releases the job at once."""
        done = asyncio.wrap_future(job.future)
        try:
            # Shielded: one caller's cancellation must not cancel a compile that others share.
            result = await asyncio.shield(done)
        except asyncio.CancelledError:  # this caller was cancelled, or the compile was (shutdown)
            if job.future.cancelled():
                raise ValueError(self._error(job.params, "its compile was cancelled")) from None
            # No one reads what the compile ends with now (a timeout as the client left): not an unread error.
            done.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        finally:
            self.release(job)
        return result

    def release(self, job: _Job) -> None:
        """A caller is done with `job`; the last one leaving ends a compile still queued or running."""
        with self._lock:
            job.waiters -= 1
            if job.waiters > 0 or job.future.done():
                return
            self._jobs.pop(job.key, None)
            if job.worker is None:
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
                job.future.cancel()
                self.counts["abandoned_queued"] += 1
                return
            # Under the lock: the worker cannot have moved on to another job, whose process this would kill.
            if job.worker.job is not job:
                return
            if not job.worker.compiling:  # its process still starts: dropped, the start is kept for the next job
                job.future.cancel()
                self.counts["abandoned_starting"] += 1
                return
            job.worker.kill()
            self.counts["abandoned_running"] += 1
        logger.info("grammar compile abandoned by its clients: killed (%s=%s)", job.params.kind, shown(job.key[1]))

    # -- workers ---------------------------------------------------------------------------------------------
    def _running(self) -> int:
        return sum(w.job is not None for w in self._workers)

    def queued(self) -> int:
        return len(self._queue)

    def _run_worker(self, worker: _Worker) -> None:
        self._local.worker = worker
        while True:
            if worker.proc is None and not self._closed:
                # Replaced at once, not when the next spec comes: a killed compile's successor need not wait for
                # the new process's start-up.
                try:
                    worker.start_child()
                except Exception:
                    if not self._closed:  # else shut down as it started (a server stopping early): nothing failed
                        logger.exception("could not start a grammar compile process")  # the next job tries again
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed:
                    break
                job = self._queue.popleft()
                job.worker, worker.job = worker, job
            try:
                result = self._compile(job)
            except _Killed:
                job.future.cancel()  # its callers left, or shutdown
            except BaseException as e:
                self.counts["timed_out" if isinstance(e, _TimedOut) else "failed"] += 1
                if not job.future.done():
                    job.future.set_exception(e)
            else:
                with self._lock:
                    self._remember(job.key, result)
                self.counts["compiled"] += 1
                if not job.future.done():
                    job.future.set_result(result)
            finally:
                with self._lock:
                    worker.job = None
                    worker.compiling = False
                    if self._jobs.get(job.key) is job:
                        del self._jobs[job.key]
        worker.close(spare=True)  # shut down: this thread owns its sockets, so it closes them

    def _compile(self, job: _Job):
        """Compile on this thread's child process (the compile threads call it); ValueError naming the field."""
        import xgrammar as xgr

        params, kind = job.params, job.key[0]
        t0 = time.monotonic()
        try:
            compiled_json = self._local.worker.run(job, self.config.timeout_s)
        except TimeoutError:
            raise _TimedOut(self._error(params, f"it did not compile within {self.config.timeout_s:g} s (the "
                                                f"grammar_compile_timeout limit): simplify it")) from None
        except ValueError as e:
            raise ValueError(self._error(params, _reason(e))) from None
        logger.debug("grammar compiled in %.3f s (%s)", time.monotonic() - t0, kind)
        return xgr.CompiledGrammar.deserialize_json(compiled_json, self.tokenizer_info())

    def _remember(self, key, compiled: xgr.CompiledGrammar) -> None:
        size = compiled.memory_size_bytes
        self._done[key] = compiled
        self._done_bytes += size
        while self._done_bytes > CACHE_LIMIT_BYTES and len(self._done) > 1:
            _, old = self._done.popitem(last=False)
            self._done_bytes -= old.memory_size_bytes

    def _error(self, params: StructuredOutputParams, why: str) -> str:
        kind = params.kind
        return f"{PREFIX}{kind}={shown(getattr(params, kind))} is invalid: {why}."

    def shutdown(self) -> None:
        """Kill every compile process and end the compile threads; waits for no compile."""
        with self._lock:
            self._closed = True
            queued, self._queue = list(self._queue), collections.deque()
            self._jobs.clear()
            self._done.clear()
            workers = list(self._workers)
            self._lock.notify_all()
        for job in queued:
            job.future.cancel()
        for w in workers:
            w.kill()
        if self._forks is not None:
            self._forks.close()
        for w in workers:
            w.thread.join(5)
            if not w.thread.is_alive():  # else the thread still uses its socket: it closes it itself
                w.close(spare=True)
        with self._info_lock:
            self._info = None


def _reason(exc: Exception) -> str:
    """xgrammar's message without its "[time] /path/file.cc:line: " prefix or final period."""
    import re

    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return re.sub(r"^(\[[^\]]*\]\s*)?\S+\.cc:\d+:\s*", "", lines[0]).rstrip(".")
