"""GatewaySupervisor against a stand-in smg (a small script): readiness, its errors, bounded restarts, stop.

The real smg is exercised by tests/server/test_managed_gateway.py; this stand-in makes the failure paths
(never ready, exits at once, keeps dying) quick and certain. Everything binds 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import http.server
import json
import os
import sys
import textwrap
import threading

import pytest

from moelink.engine.server.gateway import supervisor as gw

from tests.helpers.net import free_port

# Reads its mode from a file at each start: "ok" serves /v1/models, "exit" exits 3, "hang" never binds,
# "hang-failing" never binds and logs a failing step, "refuse" says why on stderr (coloured, as smg's log is) and
# exits 2.
FAKE_SMG = textwrap.dedent('''
    import http.server, json, sys, time
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])
    mode = open(MODE_FILE).read().strip()
    if mode == "exit":
        sys.exit(3)
    if mode == "refuse":
        print("\x1b[31mERROR\x1b[0m unknown parser name", file=sys.stderr)
        print("RuntimeError: Invalid configuration: unknown reasoning parser 'x'", file=sys.stderr)
        print("(the usage ends here)", file=sys.stderr)
        sys.exit(2)
    if mode == "abort-once":  # dies by SIGABRT at its first start only (a marker file beside the mode file)
        import os
        marker = MODE_FILE + ".aborted"
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.abort()
    if mode == "hang":
        time.sleep(600)
    if mode == "hang-failing":  # never ready, saying why (as smg does when a gpt-oss worker's encoding won't load)
        print("WARN Step failed step_id=ensure_harmony_encoding error=no vocab file", file=sys.stderr, flush=True)
        time.sleep(600)

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "m"}]}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
''')


@pytest.fixture
def fake(tmp_path):
    mode = tmp_path / "mode"
    mode.write_text("ok")
    script = tmp_path / "smg"
    script.write_text(f"#!{sys.executable}\nMODE_FILE = {str(mode)!r}\n{FAKE_SMG}")
    script.chmod(0o755)
    return script, mode


def _supervisor(script, port=None, **kw) -> gw.GatewaySupervisor:
    spec = gw.GatewaySpec(http_host="127.0.0.1", http_port=port or free_port(), worker_url="grpc://127.0.0.1:1")
    return gw.GatewaySupervisor(spec, str(script), **kw)


@pytest.fixture
def other_gateway():
    """Another OpenAI API already serving a model on a loopback port (the gateway of a first `moelink serve`),
    in this test process: its port, stopped at teardown."""
    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "builtin-model"}]}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Models)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    thread.join(10)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_restarts_with_backoff_then_gives_up_and_stop_leaves_nothing(fake, monkeypatch, caplog):
    script, mode = fake
    monkeypatch.setattr(gw, "BACKOFF_S", (0.05,))
    monkeypatch.setattr(gw, "MAX_RESTARTS", 2)

    async def run():
        sup = _supervisor(script, ready_timeout=10)
        await sup.start()
        first = sup.pid
        os.kill(first, 9)
        for _ in range(200):  # bounded: 10 s
            if sup.restarts == 1:
                break
            await asyncio.sleep(0.05)
        assert sup.restarts == 1 and sup.pid != first and _alive(sup.pid)
        # From now on every start fails at once: two more tries, then it gives up (logged), no busy loop.
        mode.write_text("exit")
        os.kill(sup.pid, 9)
        await asyncio.wait_for(sup._watch, 10)
        assert sup.restarts == 1
        await sup.stop()
        assert not _alive(sup.pid)

    asyncio.run(run())
    assert "giving up" in caplog.text


def test_a_refused_start_gives_smgs_own_reason(fake):
    script, mode = fake
    mode.write_text("refuse")
    sup = _supervisor(script)
    with pytest.raises(gw.GatewayError, match=r"exited with 2 before it was ready \(smg says: RuntimeError: Invalid "
                                              r"configuration: unknown reasoning parser 'x'\)"):
        asyncio.run(sup.start())


def test_exit_before_ready_names_the_port(fake):
    script, mode = fake
    mode.write_text("exit")
    sup = _supervisor(script)
    with pytest.raises(gw.GatewayError, match=rf"exited with 3 before it was ready \(port {sup.spec.http_port} in use\?\)"):
        asyncio.run(sup.start())


def test_a_first_start_killed_by_a_signal_is_tried_again(fake, caplog):
    """smg 1.13 sometimes aborts (SIGABRT) while starting on a loaded machine: the first start tries again, where
    an exit with a status (above) is refused at once."""
    script, mode = fake
    mode.write_text("abort-once")
    sup = _supervisor(script)

    async def run():
        await sup.start()
        assert sup.not_serving() is None
        await sup.stop()

    asyncio.run(run())
    assert "exited with -6 before it was ready" in caplog.text and "try 2 of 3" in caplog.text


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_never_ready_is_bounded_and_killed(fake):
    script, mode = fake
    mode.write_text("hang")
    sup = _supervisor(script, ready_timeout=1.0)
    with pytest.raises(gw.GatewayError, match=r"did not serve the model on port \d+ within 1 s"):
        asyncio.run(sup.start())
    assert not _alive(sup.pid)


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_never_ready_reports_smgs_last_error(fake):
    script, mode = fake
    mode.write_text("hang-failing")
    sup = _supervisor(script, ready_timeout=1.0)
    with pytest.raises(gw.GatewayError, match=r"within 1 s \(smg's last error: WARN Step failed "
                                              r"step_id=ensure_harmony_encoding error=no vocab file\)"):
        asyncio.run(sup.start())
    assert not _alive(sup.pid)


def test_command_keeps_everything_on_loopback(fake):
    script, _ = fake
    cmd = _supervisor(script).command(9999)
    assert cmd[cmd.index("--prometheus-host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_no_smg_is_one_error_naming_the_flag_and_the_fix(fake, monkeypatch):
    script, _ = fake
    spec = _supervisor(script).spec
    monkeypatch.setattr(gw, "smg_executable", lambda: None)
    with pytest.raises(gw.GatewayError, match=r"--http-port.*pip install smg.*--no-http"):
        gw.GatewaySupervisor(spec)


def test_the_key_goes_through_the_environment_not_the_command_line(fake, tmp_path):
    script, _ = fake
    cmd, env = gw._with_key([str(script), "launch", "--port", "1"], "s3cret")
    assert cmd[0] == sys.executable and "s3cret" not in " ".join(cmd) and env[gw._KEY_ENV] == "s3cret"
    binary = tmp_path / "smg-bin"
    binary.write_bytes(b"\x7fELF...")
    cmd, env = gw._with_key([str(binary), "launch"], "s3cret")  # not a script: only the command line is left
    assert cmd[-2:] == ["--api-key", "s3cret"] and gw._KEY_ENV not in env


def test_a_port_another_gateway_serves_is_refused_not_reported_as_ours(fake, other_gateway):
    """Issue 27, item 7: with a first server's gateway on the port, the second gateway's readiness probe got the
    first one's answer, so `moelink serve` said it served the OpenAI API while its own smg could not bind."""
    script, _ = fake
    sup = _supervisor(script, port=other_gateway)
    with pytest.raises(gw.GatewayError, match=rf"http_port={other_gateway} is invalid: could not bind "
                                              rf"127\.0\.0\.1:{other_gateway} \(Address already in use\).*--no-http"):
        asyncio.run(sup.start())
    assert sup.proc is None  # refused before anything was started


def test_ready_means_the_gateway_it_started_answers(fake, other_gateway, monkeypatch):
    """The port taken between the check and smg's bind: the answer on it comes from another process, so the
    gateway is not ready; it exits (it cannot bind) and that is the error, naming the port."""
    script, _ = fake
    monkeypatch.setattr(gw, "check_http_port", lambda host, port: None)
    sup = _supervisor(script, port=other_gateway, ready_timeout=30)
    with pytest.raises(gw.GatewayError, match=rf"exited with 1 before it was ready \(port {other_gateway} is "
                                              rf"taken \(Address already in use\)\)"):
        asyncio.run(sup.start())
    assert not _alive(sup.pid)


def test_the_listener_is_told_by_pid(other_gateway):
    from moelink.engine.server import ports

    assert ports.listens_on(os.getpid(), other_gateway) is True
    assert ports.listens_on(os.getpid(), free_port()) is False
    assert ports.bind_error("127.0.0.1", other_gateway) == "Address already in use"
    assert ports.bind_error("127.0.0.1", free_port()) is None
