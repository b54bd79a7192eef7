"""Issue 32 item 3: abandoned grammar compiles must not block other clients (engine/core/grammar_compile.py).

One `moelink serve` of the built-in model. Six clients send an expensive regex (each compile takes tens of
seconds; a deeply nested JSON schema did, before JSON past 128 levels was refused outright) and leave after one
second. Meanwhile another client streams unconstrained tokens:
its worst gap between two tokens stays within 2x of the same stream undisturbed. A `[a-z]+` regex request and
a 2,500-character prompt sent after them are answered within seconds (on the old code they waited for the
abandoned compiles: 33 s and 67 s in the issue), and SIGTERM exits within the drain grace plus a margin.
A schema over the time limit, one over the size limit and a full queue each get one clear error.
"""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from moelink.engine.contract.structured_output_params import StructuredOutputParams
from tests.helpers.grpc_server import ServerProcess, make_stubs
from tests.helpers.slow_specs import expensive_regex

pytest.importorskip("xgrammar")

BUILTIN = str(Path(__file__).resolve().parents[2] / "builtin-model")
FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "256"]
STREAM_TOKENS = 400


def _worst_gap(stub, pb, tokens: int = STREAM_TOKENS) -> tuple[float, int]:
    """The longest wait between two streamed tokens of an unconstrained request, and how many came."""
    t_prev, worst, n = None, 0.0, 0
    for m in stub.Generate(pb.GenerateRequest(prompt="The answer is", sampling_params=pb.SamplingParams(
            temperature=0.0, max_tokens=tokens, ignore_eos=True)), timeout=120):
        now = time.monotonic()
        if t_prev is not None:
            worst = max(worst, now - t_prev)
        t_prev, n = now, n + len(m.token_ids)
    return worst, n


def _abandon(stub, pb, regex: str) -> None:
    """A client that sends `regex` and leaves after one second (its deadline)."""
    try:
        list(stub.Generate(pb.GenerateRequest(prompt="Hi", sampling_params=pb.SamplingParams(
            max_tokens=8, regex=regex)), timeout=1.0))
    except grpc.RpcError:
        pass


def _timed(fn, out: dict, name: str) -> threading.Thread:
    def run():
        t0 = time.monotonic()
        out[name + "_result"] = fn()
        out[name] = time.monotonic() - t0
    t = threading.Thread(target=run)
    t.start()
    return t


def _leave(stub, pb, seeds) -> list[threading.Thread]:
    leavers = [threading.Thread(target=_abandon, args=(stub, pb, expensive_regex(800, seed))) for seed in seeds]
    for t in leavers:
        t.start()
    return leavers


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _assert_fork_server_forked(server_pid: int) -> None:
    """The grammar compile fork server is a fork of `moelink serve` (its command line the server's), not a fresh
    `python -m ...grammar_child --fork-server` that imports torch, transformers and xgrammar again (2.1 s of CPU)."""
    children = []
    for task in os.listdir(f"/proc/{server_pid}/task"):  # a child is listed under the thread that started it
        with open(f"/proc/{server_pid}/task/{task}/children") as f:
            children += [int(p) for p in f.read().split()]
    lines = [_cmdline(p) for p in children]
    assert lines and all(line == _cmdline(server_pid) for line in lines), lines


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_abandoned_schemas_do_not_stall_other_clients():
    srv = ServerProcess(BUILTIN, FLAGS + ["--grammar-compile-timeout", "60", "--shutdown-grace", "5"])
    try:
        with grpc.insecure_channel(srv.addr) as ch:
            s = make_stubs(ch)
            pb = s.pb
            # The compile process starts with the first grammar: not part of what is measured.
            list(s.native.Generate(pb.GenerateRequest(prompt="Hi", sampling_params=pb.SamplingParams(
                max_tokens=4, regex="[a-z]{3}")), timeout=120))
            _assert_fork_server_forked(srv.pid)
            # Warm: a stream's one-time costs (its first prefill and decode steps) come with its first tokens, as
            # test_wire_bounds.py's warm-up; the measured streams are full length, the better of two kept.
            _worst_gap(s.native, pb, 16)
            base, n = min(_worst_gap(s.native, pb) for _ in range(2))
            assert n == STREAM_TOKENS

            # Distinct regexes (no shared compile), each tens of seconds to compile in-process; their clients
            # leave after 1 s. Measured twice, the better run kept, as the undisturbed one (a shared machine's
            # noise is not the server's). The second time a regex request and a prompt long enough to be tokenized
            # off the event loop come 1.5 s in.
            leavers = _leave(s.native, pb, range(280, 286))
            first, n = _worst_gap(s.native, pb)
            for t in leavers:
                t.join(30)
            assert n == STREAM_TOKENS
            leavers = _leave(s.native, pb, range(260, 266))
            late: dict = {}
            timer = threading.Timer(1.5, lambda: late.update(threads=[
                _timed(lambda: "".join(m.text for m in s.native.Generate(pb.GenerateRequest(
                    prompt="Hello", sampling_params=pb.SamplingParams(max_tokens=6, regex="[a-z]+")), timeout=150)),
                       late, "regex"),
                _timed(lambda: list(s.native.Generate(pb.GenerateRequest(prompt="word " * 500,
                       sampling_params=pb.SamplingParams(max_tokens=2)), timeout=150)), late, "prompt")]))
            timer.start()
            disturbed, n = _worst_gap(s.native, pb)
            disturbed = min(first, disturbed)
            timer.join()
            for t in leavers + late["threads"]:
                t.join(160)
            assert n == STREAM_TOKENS
            assert re.fullmatch("[a-z]+", late["regex_result"]), late["regex_result"]
            # SIGTERM while abandoned compiles would still run: it waits for none of them.
            leavers = _leave(s.native, pb, range(270, 276))
            time.sleep(1.5)
        t0 = time.monotonic()
        srv.signal(signal.SIGTERM)
        rc = srv.wait(150)
        sigterm_s = time.monotonic() - t0
        for t in leavers:
            t.join(10)
    finally:
        srv.close()
    print(f"\nworst token gap: undisturbed {base * 1e3:.0f} ms, with 6 abandoned schemas {disturbed * 1e3:.0f} ms; "
          f"[a-z]+ request {late['regex']:.2f} s, 2,500-char prompt {late['prompt']:.2f} s; SIGTERM with 6 "
          f"abandoned compiles: exit in {sigterm_s:.1f} s (grace 5 s)")
    assert rc == 0
    # 2x, plus 100 ms for a shared 2-core machine's scheduling noise (load 5 measured 11-29 ms undisturbed).
    assert disturbed <= 2 * base + 0.1, (base, disturbed)
    assert late["regex"] < 10 and late["prompt"] < 10, late
    assert sigterm_s < 5 + 5, sigterm_s


@pytest.fixture(scope="module")
def pool():
    from moelink.engine.config.grammar_config import GrammarConfig
    from moelink.engine.core.structured_output import GrammarCompilerPool
    from moelink.engine.core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(BUILTIN)
    vocab = json.loads((Path(BUILTIN) / "config.json").read_text())["vocab_size"]
    p = GrammarCompilerPool(tok, vocab, tok.eos_token_ids,
                            GrammarConfig(timeout_s=2.0, max_spec_chars=30_000, max_queued=2))
    p.compile(StructuredOutputParams(regex="[ab]"))  # the compile process is up
    yield p
    p.shutdown()


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_time_limit_names_the_field_and_the_pool_goes_on(pool):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"^SamplingParams\.structured_outputs\.regex=.*did not compile within 2 s "
                                         r"\(the grammar_compile_timeout limit\)"):
        pool.compile(StructuredOutputParams(regex=expensive_regex(800)))
    assert time.monotonic() - t0 < 10
    assert pool.compile(StructuredOutputParams(regex="[a-z]{2}")) is not None  # a new process took over


def test_size_limit_refuses_before_compiling(pool):
    with pytest.raises(ValueError, match=r"^SamplingParams\.structured_outputs\.regex=.* is too long: 30001 "
                                         r"characters, at most 30000 \(max_grammar_chars\)"):
        pool.submit(StructuredOutputParams(regex="a" * 30_001))


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_full_queue_is_refused_and_leaving_clients_cancel(pool):
    from moelink.engine.core.structured_output import GrammarQueueFull

    running = pool.submit(StructuredOutputParams(regex=expensive_regex(800, 1)))
    time.sleep(0.5)  # taken by the worker
    queued = [pool.submit(StructuredOutputParams(regex=expensive_regex(800, 2 + i))) for i in range(2)]
    with pytest.raises(GrammarQueueFull, match=r"2 grammar compiles are waiting already \(at most 2, "
                                               r"max_queued_grammar_compiles\)"):
        pool.submit(StructuredOutputParams(regex=expensive_regex(800, 4)))
    for job in queued + [running]:  # every client leaves: nothing is compiled for them
        pool.release(job)
    assert all(j.future.cancelled() for j in queued)
    deadline = time.monotonic() + 10
    while not running.future.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running.future.cancelled()  # its process was killed, not left to finish
    t0 = time.monotonic()
    assert pool.compile(StructuredOutputParams(regex="[a-z]{5}")) is not None
    assert time.monotonic() - t0 < 30
