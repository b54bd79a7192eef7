"""The managed smg's control plane: a secret only moelink knows, and the worker registration it guards.

smg (1.13) serves its admin routes (`POST /workers` adds a worker that then gets users' prompts,
`DELETE /workers/ID` removes moelink's own, `/flush_cache`, `/get_loads`, profiling, WASM) on the same port
as the OpenAI API, open to every client unless it is given control-plane keys. So the supervisor starts
every smg with an admin key made here at start (`--control-plane-api-keys`, passed outside the command
line, like the API key), the HTTP front never relays those routes (http_front.py), and `WorkerCheck`
uses the key to notice when moelink's worker is no longer registered (smg dropped it, or someone with the
key removed it) and registers it again.

Secrets reach smg through the environment of a bootstrap that appends them to smg's argv in memory:
a command line is readable by every local user (/proc/PID/cmdline, ps).
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import secrets
import shutil
from typing import Optional

from .quirks import control_plane_key

logger = logging.getLogger(__name__)

ADMIN_KEY_ID = "moelink"
_KEY_ENV = "MOELINK_GATEWAY_API_KEY"
_ADMIN_ENV = "MOELINK_GATEWAY_ADMIN_KEY"
# Runs smg's entry-point script with the secrets appended to its argv in memory only.
_KEY_BOOTSTRAP = ("import os, runpy, sys; key = os.environ.pop(%r, None); admin = os.environ.pop(%r, None); "
                  "sys.argv = sys.argv[1:] + (['--api-key', key] if key else []) + "
                  "(['--control-plane-api-keys', %r + admin] if admin else []); "
                  "runpy.run_path(sys.argv[0], run_name='__main__')"
                  % (_KEY_ENV, _ADMIN_ENV, control_plane_key(ADMIN_KEY_ID, "")))
ADMIN_TIMEOUT_S = 5.0


def new_admin_key() -> str:
    return secrets.token_urlsafe(32)


def with_secrets(cmd: list[str], api_key: Optional[str], admin_key: Optional[str] = None) -> tuple[list[str], dict]:
    """(command, environment) that give smg `api_key` (its clients' key) and `admin_key` (its control plane's)
    without putting them on a command line when smg is a Python entry-point script (as pip installs it);
    otherwise on the command line, with a warning."""
    env = dict(os.environ)
    if not api_key and not admin_key:
        return cmd, env
    interpreter = _python_shebang(cmd[0])
    if interpreter is None:
        logger.warning("%s is not a Python script: its keys go to it on its command line, which local users "
                       "can read", cmd[0])
        extra = ["--api-key", api_key] if api_key else []
        extra += ["--control-plane-api-keys", control_plane_key(ADMIN_KEY_ID, admin_key)] if admin_key else []
        return cmd + extra, env
    if api_key:
        env[_KEY_ENV] = api_key
    if admin_key:
        env[_ADMIN_ENV] = admin_key
    return [interpreter, "-c", _KEY_BOOTSTRAP, *cmd], env


def _python_shebang(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            first = f.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    if not words:
        return None
    # "#!/venv/bin/python" or "#!/usr/bin/env python3"
    exe = words[1] if os.path.basename(words[0]) == "env" and len(words) > 1 else words[0]
    if "python" not in os.path.basename(exe):
        return None
    return exe if os.path.isabs(exe) else shutil.which(exe)


class WorkerCheck:
    """Is moelink's worker registered in the smg on 127.0.0.1:`port`, and register it again when not.

    Blocking (http.client with a timeout): call it from a thread."""

    def __init__(self, port: int, worker_url: str, admin_key: str):
        self.port, self.worker_url, self.admin_key = port, worker_url, admin_key

    def _call(self, method: str, path: str, body: Optional[dict] = None) -> tuple[int, object]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=ADMIN_TIMEOUT_S)
        try:
            headers = {"authorization": f"Bearer {self.admin_key}", "content-type": "application/json"}
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            resp = conn.getresponse()
            data = resp.read(1 << 20)
            try:
                return resp.status, json.loads(data)
            except ValueError:
                return resp.status, None
        finally:
            conn.close()

    def registered(self) -> Optional[bool]:
        """Whether smg lists the worker (None: smg did not answer, so nobody can tell)."""
        try:
            status, data = self._call("GET", "/workers")
        except (OSError, http.client.HTTPException):
            return None
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("workers"), list):
            return None
        return any(isinstance(w, dict) and w.get("url") == self.worker_url for w in data["workers"])

    def register(self) -> bool:
        """Ask smg to add the worker again (it probes it in the background); whether smg took the request."""
        try:
            status, data = self._call("POST", "/workers", {"url": self.worker_url})
        except (OSError, http.client.HTTPException):
            return False
        if status not in (200, 201, 202, 409):  # 409: a removal still in progress; the next check retries
            logger.error("the smg gateway refused to register the worker %s again: HTTP %d %s", self.worker_url,
                         status, str(data)[:200])
        return status in (200, 201, 202)
