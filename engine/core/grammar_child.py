"""The grammar compile process: `python -m moelink.engine.core.grammar_child FD`, started by
engine/core/grammar_compile.py, one per compile worker; or, with `--fork-server FD`, the process that forks them
(engine/core/grammar_forks.py: a fork has xgrammar imported and the tokenizer info built, ready in milliseconds).

Why a process and not a thread: a compile cannot be interrupted from outside (xgrammar's C++ loop, or the
schema-to-EBNF conversion in Python, which would also hold the engine process's GIL for seconds on a deeply
nested schema). In its own process a compile that runs past its time limit, or whose clients all left, is
ended by killing the process, and it never takes the engine thread's GIL or its CPU priority (niced).

Protocol on the socket FD (multiprocessing.connection framing): the parent first sends the xgrammar
TokenizerInfo as JSON, and the child answers `ready` once it can compile; then for each job the JSON `[kind,
spec]` (StructuredOutputParams.key); the answer is `["ok", compiled grammar JSON]` or `["error", reason]`. A fork
server answers `ready` too; then for each `fork` and the socket passed after it (SCM_RIGHTS) it forks a child
that answers `ready` on that socket and compiles as above, and answers the child's PID and a pidfd of it (`-1`
when the fork failed).
"""
from __future__ import annotations

import json
import os
import sys
from multiprocessing.connection import Connection


def compile_spec(compiler, kind: str, spec: str):
    """The compiled grammar of one (kind, spec) key (StructuredOutputParams.key)."""
    from .json_schema_grammar import schema_ebnf
    from ..contract.structured_output_params import choice_ebnf

    # JSON goes through engine/core/json_schema_grammar.py, which corrects what xgrammar's converter gets wrong
    # (invalid JSON in some strings, unbounded numbers) and prints compact JSON (no free whitespace between
    # tokens: a weak model otherwise may emit whitespace until max_tokens, vLLM's --disable-any-whitespace).
    if kind == "json":
        return compiler.compile_grammar(schema_ebnf(json.loads(spec)))
    if kind == "json_object":
        return compiler.compile_grammar(schema_ebnf({"type": "object"}))
    if kind == "regex":
        return compiler.compile_regex(spec)
    if kind == "grammar":
        return compiler.compile_grammar(spec)
    if kind == "structural_tag":
        return compiler.compile_structural_tag(spec)
    return compiler.compile_grammar(choice_ebnf(json.loads(spec)))


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        # Ends with its parent even when a compile keeps it from reading the socket (a SIGKILLed server).
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main(fd: int, fork_server: bool = False) -> None:
    import signal

    # A terminal's Ctrl-C reaches the whole foreground process group, this process too: the server drains and
    # then ends it (its socket closed, or SIGKILL), so SIGINT here would only print a KeyboardInterrupt traceback
    # over the server's shutdown lines (issue 48). Forked compile processes inherit this.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Below the engine: on a machine with as many busy threads as cores, the step loop gets the CPU first.
    os.nice(10)
    _die_with_parent()
    import xgrammar as xgr

    conn = Connection(fd)
    info = xgr.TokenizerInfo.deserialize_json(conn.recv_bytes().decode())
    if fork_server:
        _fork_server(conn, info)
    else:
        _serve(conn, info)


def _fork_server(conn: Connection, info) -> None:
    """Fork a compile process per request until the parent closes the socket (module docstring)."""
    import signal
    from multiprocessing import reduction

    from . import json_schema_grammar  # noqa: F401  (imported once here, not in every child)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children: no zombies
    parent = os.getpid()
    conn.send_bytes(b"ready")
    while True:
        try:
            conn.recv_bytes()
            fd = reduction.recv_handle(conn)
        except (EOFError, OSError):
            return  # the parent closed the socket or exited
        try:
            pid = os.fork()
        except OSError:
            os.close(fd)
            conn.send_bytes(b"-1")
            continue
        if pid == 0:  # the child: never returns into this loop
            try:
                conn.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _die_with_parent()
                if os.getppid() == parent:  # else the fork server died before the line above
                    _serve(Connection(fd), info)
            finally:
                os._exit(0)
        os.close(fd)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # it died already
            conn.send_bytes(b"-1")
            continue
        conn.send_bytes(str(pid).encode())
        reduction.send_handle(conn, pidfd, 0)
        os.close(pidfd)


def _serve(conn: Connection, info) -> None:
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=64 << 20)
    conn.send_bytes(b"ready")  # the parent times each compile from here, not from the interpreter's start
    while True:
        try:
            kind, spec = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the parent closed the socket or exited
        try:
            answer = ["ok", compile_spec(compiler, kind, spec).serialize_json()]
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
            answer = ["error", str(e) or type(e).__name__]
        conn.send_bytes(json.dumps(answer).encode())


if __name__ == "__main__":
    main(int(sys.argv[-1]), fork_server=sys.argv[1] == "--fork-server")
