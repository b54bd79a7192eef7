"""Ctrl-C in a terminal reaches the grammar compile process too (the foreground process group): it must print no
KeyboardInterrupt traceback over the server's shutdown and keep compiling until the server ends it (issue 48)."""
from __future__ import annotations

import pytest

import json
import signal
import socket
import subprocess
import sys
from multiprocessing.connection import Connection

import xgrammar as xgr


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_sigint_leaves_the_compile_process_quiet_and_working():
    parent, child = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-m", "moelink.engine.core.grammar_child", str(child.fileno())],
                            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    child.close()
    conn = Connection(parent.detach())
    try:
        info = xgr.TokenizerInfo([f"t{i}" for i in range(8)] + ["a", "b"])
        conn.send_bytes(info.serialize_json().encode())
        assert conn.poll(120) and conn.recv_bytes() == b"ready"
        proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C does to every process of the group
        conn.send_bytes(json.dumps(["regex", "a+"]).encode())  # still compiles after it
        assert conn.poll(120) and json.loads(conn.recv_bytes())[0] == "ok"
    finally:
        conn.close()  # how the server ends it
    assert proc.wait(60) == 0
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
