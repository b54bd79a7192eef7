"""Issue 54 item 8: `OSError: [Errno 9] Bad file descriptor` from grammar_forks.py after "server stopped".

A forked compile process is named by a pidfd (engine/core/grammar_forks.py: Forked), which more than one thread
uses: the pool kills a worker's process from the thread where its last client left, and shutdown kills every
worker's process while each worker's own thread polls, kills, waits for and reaps it. The pidfd was closed by
whichever thread saw the process gone first, with no lock: the other thread's poll or signal then went through a
closed number (EBADF), or the number was closed twice, the second time closing whatever the server had opened under
it since (a socket, gRPC's epoll descriptor). The pidfd is now used and closed under a lock, once.

Also: the pidfd was polled with select(), which refuses descriptors past 1023 (a server with many connections
has them), and a fork server killed by shutdown while it started was reported as "did not start within 120 s"
with a traceback (the server stopping early, e.g. a refused flag)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moelink.engine.core import grammar_forks
from moelink.engine.core.grammar_forks import Forked

pytestmark = pytest.mark.skipif(not grammar_forks.supported(), reason="pidfds (Linux 5.3+) only")

BUILTIN = str(Path(__file__).resolve().parents[2] / "builtin-model")


def _forked(seconds: float = 60.0) -> tuple[Forked, subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    return Forked(proc.pid, os.pidfd_open(proc.pid)), proc


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.fixture
def fast_switching():
    """Switch threads every microsecond, so that two threads interleave inside the few lines where they race."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_threads_that_kill_poll_and_reap_one_process_never_touch_a_closed_pidfd(fast_switching):
    errors: list[BaseException] = []
    for _ in range(200):
        f, proc = _forked()
        # Descriptors the process opens meanwhile take the lowest free numbers: the pidfd's, once it is closed.
        # A second close of that number would close one of them.
        bystanders: list[int] = []
        start = threading.Barrier(5)

        def run(op):
            try:
                start.wait()
                op()
            except BaseException as e:  # noqa: BLE001 (what the test is about)
                errors.append(e)

        def reap():  # the worker's thread: Worker.close
            f.poll()
            f.kill()
            f.wait(5)

        def open_some():
            start.wait()
            for _ in range(4):
                r, w = os.pipe()
                bystanders.extend((r, w))

        threads = [threading.Thread(target=run, args=(op,)) for op in (reap, f.kill, f.poll, lambda: f.wait(5))]
        threads.append(threading.Thread(target=open_some))
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        proc.wait(10)
        assert f.poll() == -9 and f.wait(1) == -9
        closed = [fd for fd in bystanders if not _is_open(fd)]
        for fd in bystanders:
            if _is_open(fd):
                os.close(fd)
        assert not errors, errors[:3]
        assert not closed, f"descriptors closed by someone else: {closed}"


def test_a_pidfd_numbered_past_1023_is_polled():
    f, proc = _forked(0.2)
    high = 1500
    os.dup2(f._pidfd, high)
    os.close(f._pidfd)
    f._pidfd = high
    try:
        assert f.poll() is None  # select() refused it: ValueError "filedescriptor out of range in select()"
        assert f.wait(10) == -9
        assert not _is_open(high)
    finally:
        proc.wait(10)


@pytest.fixture(scope="module")
def tokenizer():
    from moelink.engine.core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(BUILTIN)
    return tok, json.loads((Path(BUILTIN) / "config.json").read_text())["vocab_size"]


def _pool(tokenizer):
    from moelink.engine.config.grammar_config import GrammarConfig
    from moelink.engine.core.grammar_compile import GrammarCompilerPool

    tok, vocab = tokenizer
    return GrammarCompilerPool(tok, vocab, tok.eos_token_ids, GrammarConfig(timeout_s=30.0))


class _Recorded(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def recorded(monkeypatch):
    """Exceptions of any thread, and warnings or worse from the grammar modules."""
    handler = _Recorded()
    log = logging.getLogger("moelink.engine.core")
    log.addHandler(handler)
    raised: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    yield handler.records, raised
    log.removeHandler(handler)


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_shutdown_while_compiles_run_and_clients_leave_raises_nothing(tokenizer, recorded, fast_switching):
    pytest.importorskip("xgrammar")
    from moelink.engine.contract.structured_output_params import StructuredOutputParams
    from tests.helpers.slow_specs import expensive_regex

    records, raised = recorded
    for i in range(4):
        pool = _pool(tokenizer)
        pool.compile(StructuredOutputParams(regex="[ab]"))  # the compile process and its spare are up
        job = pool.submit(StructuredOutputParams(regex=expensive_regex(800, i)))
        deadline = time.monotonic() + 30
        while not any(w.compiling for w in pool._workers) and time.monotonic() < deadline:
            time.sleep(0.01)
        # The client leaves (its compile is killed) as the server shuts down: both kill the same process.
        leave = threading.Thread(target=pool.release, args=(job,))
        leave.start()
        pool.shutdown()
        leave.join(10)
        for w in pool._workers:
            w.thread.join(10)
    assert not raised, raised[:3]
    assert not records, [r.getMessage() for r in records[:3]]


def test_a_fork_server_closed_while_it_starts_is_not_reported_as_a_failure(tokenizer, recorded):
    pytest.importorskip("xgrammar")
    records, raised = recorded
    pool = _pool(tokenizer)
    pool.prestart()  # a server does at start; it is stopped before the fork server is up (a refused flag)
    time.sleep(0.3)
    pool.shutdown()
    for w in pool._workers:
        w.thread.join(10)
    assert not raised, raised
    assert not records, [(r.getMessage(), r.exc_info and str(r.exc_info[1])) for r in records]


@pytest.mark.slow  # over 1 s (one fork server start: xgrammar imported once, ~2.7 s of CPU)
def test_a_shut_down_pools_fork_server_serves_the_next_pool(tokenizer):
    """An engine's pool that shuts down keeps its idle fork server for the next pool with the same tokenizer (one
    xgrammar import per process, not per engine: ~2.7 s of CPU each), even when the thread that started it has
    ended (the parent-death signal follows the starting thread: grammar_forks._keeper_popen)."""
    pytest.importorskip("xgrammar")
    grammar_forks.discard_idle()
    first, second = _pool(tokenizer), _pool(tokenizer)
    got = []
    starter = threading.Thread(target=lambda: got.append(first._forks.fork()))  # as a compile worker's thread
    starter.start()
    starter.join(60)
    forked, conn = got[0]
    server = first._forks._proc
    assert conn.poll(30) and conn.recv_bytes() == b"ready"
    forked.kill()
    conn.close()
    first.shutdown()
    try:
        forked, conn = second._forks.fork()
        assert second._forks._proc is server and server.poll() is None, "the kept fork server was not reused"
        assert conn.poll(30) and conn.recv_bytes() == b"ready"
        forked.kill()
        conn.close()
    finally:
        second.shutdown()
        grammar_forks.discard_idle()
    assert server.poll() is not None
