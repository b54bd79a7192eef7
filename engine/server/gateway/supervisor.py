"""The managed OpenAI HTTP gateway: `moelink serve --http-port N` runs smg as a supervised child.

vLLM's `serve` gives HTTP in one command; moelink speaks gRPC, and the smg gateway (PyPI `smg`) turns
that into the OpenAI API. Rather than have the user learn and run a second program, the server starts
smg in front of its own gRPC port, restarts it with backoff when it dies (quickly a few times, then
slower, never giving up while the server runs: `not_serving()` says why the OpenAI API is down meanwhile,
for health and metrics), and stops it by PID when the server stops. smg runs in its own process group so
a Ctrl-C in the terminal reaches the server, which drains first and then stops smg: the gateway must
outlive no request and no server. smg listens on loopback; the HTTP port is the server's own front
(http_front.py), which hands smg the request fields it would drop and relays no control-plane route.
smg's control plane takes an admin key made at start (admin.py); with it the supervisor checks
that smg still lists moelink's worker, and registers it again when not.
"""
from __future__ import annotations

import asyncio
import collections
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from .admin import _KEY_ENV, WorkerCheck, new_admin_key, with_secrets  # noqa: F401 (_KEY_ENV: tests)
from .options import alias_args
from .http_wire import keep_alive_s
from .output import TAIL_LINES, keep_tail, smg_refusal
from .quirks import relay_request_id_args, start_crashed, tokenizer_ready
from .hangups import RELAY_HEADER
from .http_front import HttpFront
from ..ports import bind_error, listens_on

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0  # smg starts in about a second; it lists the model once its health probe passed
STOP_TIMEOUT_S = 10.0  # after SIGTERM, before SIGKILL
MAX_RESTARTS = 5  # quick restarts within RESTART_WINDOW_S; then slower ones (SLOW_BACKOFF_S), reported
RESTART_WINDOW_S = 300.0
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
# After MAX_RESTARTS quick ones: a gateway that keeps dying is a fault to report (health, metrics, log), but
# not a reason to leave the OpenAI API down for good while the server runs (a full disk, a port held for a
# while): keep trying, slower.
SLOW_BACKOFF_S = (15.0, 30.0, 60.0)
# A first start that dies by a signal before it is ready (quirks.start_crashed: smg 1.13 aborting, SIGABRT, now
# and then on a loaded machine) is tried again this many times in all; an exit with a status (a refusal) is not.
START_ATTEMPTS = 3
WORKER_CHECK_S = 2.0  # how often smg is asked whether it still lists moelink's worker
INSTALL_HINT = ("`moelink serve --http-port` runs the smg gateway for the OpenAI API, and smg is not installed: "
                "`pip install smg` in this environment (or `pip install -e '.[test]'`), or pass --no-http to "
                "serve gRPC only.")


class GatewayError(ValueError):
    """The managed gateway could not be started (not installed, port taken, never ready).

    A ValueError so that the CLI prints it as its one-line error, like any other bad flag."""


def check_http_port(host: str, port: int) -> None:
    """GatewayError unless `host:port` can be bound now: another server on it (a second `moelink serve`) would
    answer the new gateway's readiness probe, and the new gateway itself could never bind."""
    reason = bind_error(host, port)
    if reason is not None:
        raise GatewayError(f"http_port={port} is invalid: could not bind {host}:{port} ({reason}): another server "
                           f"(a second `moelink serve`?) holds it; stop it, pick another --http-port, or pass "
                           f"--no-http to serve gRPC only.")


def check_can_start(http_host: str, http_port: int) -> None:
    """GatewayError unless the managed gateway can start on `http_host:http_port`: smg is installed, the port is
    free and the front's keep-alive setting is good (http_wire.keep_alive_s). Said before any weights load."""
    if smg_executable() is None:
        raise GatewayError(INSTALL_HINT)
    check_http_port(http_host, http_port)
    try:
        keep_alive_s()
    except ValueError as e:
        raise GatewayError(str(e)) from None


def smg_executable() -> Optional[str]:
    """smg beside this Python (a venv that was not activated) or on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "smg")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which("smg")


def free_loopback_port() -> int:
    # smg takes no port 0 for its metrics; the tiny race between this close and smg's bind is caught by
    # the readiness wait (smg exits, and is restarted on a fresh port).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class GatewaySpec:
    """What smg is started with: all decided by the server's config before the first start."""

    http_host: str
    http_port: int
    worker_url: str  # grpc://HOST:PORT of the server's own (or gateway) listener
    metrics_host: str = "127.0.0.1"
    metrics_port: Optional[int] = None  # None: a free loopback port, chosen at each start
    api_key: Optional[str] = None  # the server's key: smg asks the same of its HTTP clients
    tokenizer_path: Optional[str] = None
    extra_args: list[str] = field(default_factory=list)
    # The worker's further model names (vLLM's served names after the first, the model argument as given): smg
    # routes each to the worker's own (`--model-alias NAME=SERVED`) and answers with the first, as vLLM does.
    served_model_name: Optional[str] = None
    model_aliases: tuple[str, ...] = ()


class GatewaySupervisor:
    """Start, watch, restart and stop one smg process. `start()`/`stop()` on the server's event loop."""

    def __init__(self, spec: GatewaySpec, exe: Optional[str] = None, *, ready_timeout: float = READY_TIMEOUT_S,
                 log_path: Optional[str] = None, front: Optional[HttpFront] = None):
        self.spec = spec
        self.front = front  # stopped with smg
        self.exe = exe or smg_executable()
        if self.exe is None:
            raise GatewayError(INSTALL_HINT)
        self.ready_timeout = ready_timeout
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None
        self.metrics_port: Optional[int] = None
        self.restarts = 0
        self.crashes = 0  # exits it did not ask for, over the server's life
        self._restart_times: list[float] = []
        self._watch: Optional[asyncio.Task] = None
        self._recover: Optional[asyncio.Task] = None  # the slow retries after MAX_RESTARTS quick ones
        self._worker_watch: Optional[asyncio.Task] = None
        self._stopping = False
        self.admin_key = new_admin_key()  # smg's control plane: only this process knows it
        self.worker_missing = False
        self.worker_registrations = 0  # times moelink's worker was registered again
        self._output: tuple = ((), None)  # (smg's last output lines, the thread reading them) of the running smg

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def describe(self) -> str:
        """The gateway as the server's start line names it: its process and where its own metrics are."""
        return (f"smg gateway pid {self.pid}; its metrics on http://{self.spec.metrics_host}:{self.metrics_port}"
                "/metrics")

    def command(self, metrics_port: int) -> list[str]:
        s = self.spec
        cmd = [self.exe, "launch", "--host", s.http_host, "--port", str(s.http_port),
               "--prometheus-host", s.metrics_host, "--prometheus-port", str(metrics_port),
               "--worker-urls", s.worker_url, "--log-level", "warn", "--shutdown-grace-period-secs", "1",
               # The request id is the front's relay id (hangups.py), and only it: the server ends the request
               # of an HTTP client that hung up by that id, which smg does not do itself.
               *relay_request_id_args(RELAY_HEADER)]
        if s.tokenizer_path:
            cmd += ["--tokenizer-path", s.tokenizer_path]
        return cmd + alias_args(s.served_model_name, s.model_aliases) + list(s.extra_args)

    async def start(self) -> None:
        """Spawn smg and wait (bounded) until it serves the model; then watch it, and its worker list."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                await self._spawn_ready()
                break
            except GatewayError as exc:
                code = None if self.proc is None else self.proc.poll()
                crashed = start_crashed(code, bind_error(self.spec.http_host, self.spec.http_port) is None)
                if not crashed or attempt == START_ATTEMPTS or self._stopping:
                    raise
                logger.warning("%s; starting it again (try %d of %d)", exc, attempt + 1, START_ATTEMPTS)
                await asyncio.sleep(BACKOFF_S[0])
        self._watch = asyncio.create_task(self._supervise())
        self._worker_watch = asyncio.create_task(self._watch_worker())

    def not_serving(self) -> Optional[str]:
        """Why the OpenAI API cannot serve now (smg is down, or lists no worker of ours), or None."""
        if self._stopping:
            return "the OpenAI gateway is stopping."
        recovering = self._recover is not None and not self._recover.done()
        if self.proc is None or self.proc.poll() is not None or recovering:
            return (f"the OpenAI gateway (smg) is not running; it is being restarted ({self.crashes} crashes so "
                    "far); gRPC still serves.")
        if self.worker_missing:
            return "the OpenAI gateway (smg) lists no moelink worker; it is being registered again."
        return None

    async def _spawn_ready(self) -> None:
        check_http_port(self.spec.http_host, self.spec.http_port)
        self.metrics_port = self.spec.metrics_port or free_loopback_port()
        cmd, env = with_secrets(self.command(self.metrics_port), self.spec.api_key, self.admin_key)
        log = open(self.log_path, "ab") if self.log_path else subprocess.PIPE
        try:
            # Own session and process group: the terminal's Ctrl-C goes to the server alone, which drains
            # before it stops the gateway (smg would otherwise drop in-flight HTTP requests at once). No
            # preexec_fn (dying_with_parent says why): Popen then starts smg with vfork, not fork.
            self.proc = subprocess.Popen(dying_with_parent(cmd), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        finally:
            if log is not subprocess.PIPE:
                log.close()
        tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
        reader = None
        if self.proc.stdout is not None:
            reader = threading.Thread(target=keep_tail, args=(self.proc.stdout, tail), daemon=True,
                                      name="smg-output")
            reader.start()
        self._output = (tail, reader)  # read on after the start: a later exit is logged with smg's last error
        deadline = time.monotonic() + self.ready_timeout
        while not await asyncio.to_thread(self._ready):
            if self.proc.poll() is not None:
                if reader is not None:
                    await asyncio.to_thread(reader.join, 2.0)  # smg's last words, read to its EOF
                refusal = smg_refusal(tail)
                taken = bind_error(self.spec.http_host, self.spec.http_port)  # smg is gone: anyone there is not it
                why = f"port {self.spec.http_port} is taken ({taken})" if taken else \
                    f"smg says: {refusal}" if refusal else f"port {self.spec.http_port} in use?"
                raise GatewayError(f"the smg gateway exited with {self.proc.returncode} before it was ready "
                                   f"({why}){self._log_hint()}")
            if time.monotonic() >= deadline:
                await self._terminate()
                if reader is not None:
                    await asyncio.to_thread(reader.join, 2.0)
                refusal = smg_refusal(tail)  # e.g. a gpt-oss worker whose Harmony encoding smg could not load
                said = f" (smg's last error: {refusal})" if refusal else ""
                raise GatewayError(f"the smg gateway did not serve the model on port {self.spec.http_port} "
                                   f"within {self.ready_timeout:g} s{said}{self._log_hint()}")
            await asyncio.sleep(0.2)

    def _log_hint(self) -> str:
        return f"; its log: {self.log_path}" if self.log_path else "; MOELINK_GATEWAY_LOG=FILE keeps its log"

    def _ready(self) -> bool:
        """The gateway this supervisor started listens on the HTTP port, and lists the model there. Checked by
        its PID first: a server that already held the port (or took it since) answers /v1/models just as well."""
        if listens_on(self.proc.pid, self.spec.http_port) is False:
            return False
        model = self._listed_model()
        return model is not None and self._tokenizes(model)

    def _ask(self, method: str, path: str, body: Optional[dict] = None) -> tuple[int, bytes]:
        """One request to the gateway's own port (status, body); OSError when it does not answer."""
        host = "127.0.0.1" if self.spec.http_host in ("0.0.0.0", "") else self.spec.http_host
        host = "::1" if host == "::" else host.strip("[]")
        headers = {"authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}
        if body is not None:
            headers["content-type"] = "application/json"
        conn = http.client.HTTPConnection(host, self.spec.http_port, timeout=2)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _listed_model(self) -> Optional[str]:
        """The first model id smg lists once it has probed the worker (it says 'unknown' before); None until then."""
        try:
            status, raw = self._ask("GET", "/v1/models")
            ids = [m["id"] for m in json.loads(raw)["data"]] if status == 200 else []
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return ids[0] if ids and "unknown" not in ids else None

    def _tokenizes(self, model: str) -> bool:
        """smg has registered `model`'s tokenizer (quirks.tokenizer_ready: it lists a model before that, and its
        generation routes answer 503 until then); tokenizing one word runs no engine work."""
        try:
            return tokenizer_ready(*self._ask("POST", "/v1/tokenize", {"model": model, "prompt": "ready"}))
        except OSError:
            return False

    async def _supervise(self) -> None:
        """Restart smg when it exits on its own, with backoff: MAX_RESTARTS quick tries in RESTART_WINDOW_S,
        then hand over to the slow retries (_recover_slowly)."""
        while not self._stopping:
            code = await asyncio.to_thread(self.proc.wait)
            if self._stopping:
                return
            self.crashes += 1
            why = await self._exit_reason(code)  # every restart is logged with it
            now = time.monotonic()
            self._restart_times = [t for t in self._restart_times if now - t < RESTART_WINDOW_S]
            if len(self._restart_times) >= MAX_RESTARTS:
                logger.error("the smg gateway (pid %d) exited with %s; %d restarts in %.0f s already: giving up "
                             "quick restarts, the OpenAI API on port %d is down (gRPC still serves); retrying every "
                             "%g to %g s", self.proc.pid, why, MAX_RESTARTS, RESTART_WINDOW_S,
                             self.spec.http_port, SLOW_BACKOFF_S[0], SLOW_BACKOFF_S[-1])
                self._recover = asyncio.create_task(self._recover_slowly())
                return
            delay = BACKOFF_S[min(len(self._restart_times), len(BACKOFF_S) - 1)]
            self._restart_times.append(now)
            logger.warning("the smg gateway (pid %d) exited with %s; restarting in %.1f s", self.proc.pid, why, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._spawn_ready()
            except GatewayError as exc:
                logger.error("restarting the smg gateway failed: %s", exc)
                continue  # the wait above returns at once for an exited process: counts as the next attempt
            self._back()

    async def _exit_reason(self, code: int) -> str:
        """`code` as a restart's log line says it: a signal by name, and smg's last error line (or where its log
        is)."""
        tail, reader = self._output
        if reader is not None:
            await asyncio.to_thread(reader.join, 2.0)  # smg's last words, read to its EOF
        said = smg_refusal(tail)
        why = str(code)
        if code is not None and code < 0:
            try:
                why += f" ({signal.Signals(-code).name})"
            except ValueError:
                pass
        return why + (f" (smg's last error: {said})" if said else self._log_hint().replace("; ", " (", 1) + ")")

    async def _recover_slowly(self) -> None:
        """After the quick restarts: try again every SLOW_BACKOFF_S (growing to its last value) until smg
        serves, then watch it as at first, with a fresh quick-restart budget."""
        attempt = 0
        while not self._stopping:
            await asyncio.sleep(SLOW_BACKOFF_S[min(attempt, len(SLOW_BACKOFF_S) - 1)])
            attempt += 1
            if self._stopping:
                return
            try:
                await self._spawn_ready()
            except GatewayError as exc:
                logger.error("restarting the smg gateway failed (try %d of the slow retries): %s", attempt, exc)
                continue
            self._restart_times = []
            self._back()
            self._watch = asyncio.create_task(self._supervise())
            return

    def _back(self) -> None:
        self.restarts += 1
        logger.info("the smg gateway is back (pid %d) on %s:%d", self.proc.pid, self.spec.http_host,
                    self.spec.http_port)

    async def _watch_worker(self) -> None:
        """Every WORKER_CHECK_S: does smg still list moelink's worker? If not (smg dropped it, or it was
        removed through the control plane), say so (not_serving) and register it again."""
        while not self._stopping:
            await asyncio.sleep(WORKER_CHECK_S)
            proc = self.proc
            if self._stopping or proc is None or proc.poll() is not None:
                continue  # smg is down: the supervisor restarts it, with the worker on its command line
            check = WorkerCheck(self.spec.http_port, self.spec.worker_url, self.admin_key)
            listed = await asyncio.to_thread(check.registered)
            if listed is None or proc is not self.proc:
                continue
            if listed:
                if self.worker_missing:
                    logger.info("the smg gateway lists moelink's worker %s again", self.spec.worker_url)
                self.worker_missing = False
                continue
            if not self.worker_missing:
                logger.error("the smg gateway (pid %d) no longer lists moelink's worker %s: the OpenAI API cannot "
                             "serve; registering it again", proc.pid, self.spec.worker_url)
            self.worker_missing = True
            if await asyncio.to_thread(check.register):
                self.worker_registrations += 1

    async def stop(self) -> None:
        """Stop watching, then SIGTERM smg by PID and SIGKILL it after STOP_TIMEOUT_S. Idempotent."""
        self._stopping = True
        for task in (self._watch, self._recover, self._worker_watch):
            if task is not None and not task.done():
                task.cancel()
        self._watch = self._recover = self._worker_watch = None
        await self._terminate()
        if self.front is not None:
            await self.front.stop()

    async def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("the smg gateway (pid %d) did not stop within %.0f s: killing it", proc.pid, STOP_TIMEOUT_S)
            proc.kill()
            await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)

    def kill_now(self) -> None:
        """Last resort from a synchronous path (the server is exiting on an exception): SIGKILL by PID."""
        self._stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)


def _with_key(cmd: list[str], api_key: Optional[str]) -> tuple[list[str], dict]:
    """(command, environment) that give smg `api_key` off its command line (admin.with_secrets)."""
    return with_secrets(cmd, api_key)


# Run as `python -c _DIES_WITH_PARENT PARENT_PID CMD...`: asks the kernel for SIGTERM when the parent goes
# (PR_SET_PDEATHSIG, kept across exec), gives up if the parent is gone already, then becomes CMD.
_DIES_WITH_PARENT = ("import ctypes, os, signal, sys; "
                     "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "
                     "os.getppid() == int(sys.argv[1]) or sys.exit(1); "
                     "os.execvp(sys.argv[2], sys.argv[2:])")


def dying_with_parent(cmd: list[str]) -> list[str]:
    """`cmd` run so that it gets SIGTERM if the server dies without stopping it (SIGKILL, OOM), so no gateway
    outlives its server. Linux only (prctl); elsewhere stop() is the only guard.

    Through a tiny bootstrap rather than a preexec_fn: a preexec_fn makes Popen fork(), and a fork while gRPC's
    threads run makes gRPC print `fork_posix.cc:71 Other threads are currently calling into gRPC, skipping fork()
    handlers` at every start (and run its fork handlers for nothing); without one, Popen uses vfork, which runs no
    fork handlers. The bootstrap exec()s the command itself: the PID Popen returns is smg's."""
    if sys.platform != "linux":
        return list(cmd)
    return [sys.executable, "-c", _DIES_WITH_PARENT, str(os.getpid()), *cmd]
