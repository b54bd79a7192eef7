"""The grammar compile process: `python -m moelink.engine.core.grammar_child FD`, started by
engine/core/grammar_compile.py, one per compile worker.

Why a process and not a thread: a compile cannot be interrupted from outside (xgrammar's C++ loop, or the
schema-to-EBNF conversion in Python, which would also hold the engine process's GIL for seconds on a deeply
nested schema). In its own process a compile that runs past its time limit, or whose clients all left, is
ended by killing the process, and it never takes the engine thread's GIL or its CPU priority (niced).

Protocol on the socket FD (multiprocessing.connection framing): the parent first sends the xgrammar
TokenizerInfo as JSON, and the child answers `ready` once it can compile; then for each job the JSON `[kind, spec]` (StructuredOutputParams.key); the answer
is `["ok", compiled grammar JSON]` or `["error", reason]`.
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
    return compiler.compile_grammar(choice_ebnf(json.loads(spec)))


def main(fd: int) -> None:
    # Below the engine: on a machine with as many busy threads as cores, the step loop gets the CPU first.
    os.nice(10)
    if sys.platform.startswith("linux"):
        # Ends with the server even when a compile keeps it from reading the socket (SIGKILLed server).
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    import xgrammar as xgr

    conn = Connection(fd)
    info = xgr.TokenizerInfo.deserialize_json(conn.recv_bytes().decode())
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
    main(int(sys.argv[1]))
