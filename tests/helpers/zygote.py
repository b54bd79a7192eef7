"""Python subprocesses of the tests forked from one interpreter that has torch imported (issue 55: the suite's
CPU is mostly process starts; importing torch is ~1.9 s of CPU of every `python -m ...` the tests start).

`popen(cmd, ...)` is `subprocess.Popen` for `[sys.executable, "-m", module, *args]`: the process is forked by a
zygote (one per test process, started on first use, `python tests/helpers/zygote.py SOCKET`) that imported torch, numpy
and transformers once (PRELOAD; and moelink's serving modules, PRELOAD_OPTIONAL), and then runs `module` as `python -m` would (`runpy`, `__main__`, its argv, environment, working directory,
stdin/stdout/stderr, sys.path with the child's PYTHONPATH), exiting through the interpreter's normal shutdown
(atexit handlers and finalizers run). It is a real process: its pid takes signals, its exit status is Popen's
(negative for a signal). Anything else, and any environment that differs from the zygote's in what an import of
torch or transformers reads (OpenMP/MKL thread counts, TORCH_*, LD_*, HF_*, ...), gets a plain `subprocess.Popen`: nothing about what is
tested changes, only the CPU a start costs.

What the tests check is unchanged: the same module's `__main__` runs with the same arguments and environment. What
differs: the process's parent is the zygote (a test that inspects the process tree by parent uses plain Popen: pass
`zygote=False`), and torch is already imported when the module starts (its import-time settings are the zygote's,
which is why the environment must match). `MOELINK_TEST_ZYGOTE=0` turns it off for a run.
"""
from __future__ import annotations

import array
import atexit
import contextlib
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ENV_SWITCH = "MOELINK_TEST_ZYGOTE"
# What an import of torch (and the OpenMP / MKL runtimes it loads) reads from the environment: a child asking for
# other values than the zygote was started with gets a plain exec.
_IMPORT_ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "TORCH", "PYTORCH", "LD_", "CUDA_",
                        "MALLOC_", "PYTHONHASHSEED", "PYTHONMALLOC", "PYTHONDEVMODE", "PYTHONWARNINGS",
                        "PYTHONOPTIMIZE", "PYTHONFAULTHANDLER", "PYTHONNOUSERSITE", "PYTHONUSERBASE", "PYTHONHOME",
                        "PYTHONSAFEPATH", "PYTHONIOENCODING", "PYTHONUTF8", "LC_", "LANG",
                        # transformers and huggingface_hub read these at import (cache paths, offline mode,
                        # verbosity): the zygote imports them too (PRELOAD)
                        "HF_", "HUGGINGFACE", "TRANSFORMERS", "XDG_CACHE_HOME", "TOKENIZERS_")
# What the zygote imports before it forks: torch (~1.9 s of CPU a start), and transformers with the classes every
# engine start resolves through its lazy module (configs, tokenizers: ~0.8 s more; a `moelink serve`, a KV prefill
# process and most script smokes read a checkpoint's config).
PRELOAD = ("torch", "numpy", "transformers")
PRELOAD_ATTRS = (("transformers", ("AutoConfig", "PreTrainedConfig", "AutoTokenizer", "PreTrainedTokenizerFast")),)
# Then moelink's engine, rank and CLI modules: what every `moelink serve`, Ray rank and most benchmark children
# import before their first step. Only modules that import none of moelink's optional third-party dependencies
# (gRPC, xgrammar, Ray, smg, NIXL, Triton: OPTIONAL_DEPENDENCIES, tests/test_zygote.py checks): a child may run
# where one of those is missing or hidden (the GPU image's, simulated by a sitecustomize that blocks their import),
# and a module the zygote imported would bypass that. None of moelink's modules reads the environment at import
# (checked there too), so the import environment above still decides. A child whose sys.path finds another moelink
# (a PYTHONPATH or working directory with its own `moelink/`) gets none of these: they are dropped before its code
# runs (_own_moelink); nor does a `-m` child get the module it runs (dropped: runpy runs a fresh copy as __main__, as
# an exec'd start does).
PRELOAD_OPTIONAL = ("moelink.engine.api.cli", "moelink.engine.api.llm", "moelink.engine.server.cli",
                    "moelink.engine.rank.worker")
OPTIONAL_DEPENDENCIES = ("grpc", "grpc_health", "grpc_reflection", "smg", "smg_grpc_proto", "xgrammar", "ray", "nixl",
                         "triton", "fla")


def _moelink_on_path(path: list[str]) -> str | None:
    """Where `import moelink` resolves through sys.path entries `path` (a folder's `moelink/`), or None (then the
    editable install's finder decides: the same for every child)."""
    from importlib.machinery import PathFinder

    spec = PathFinder.find_spec("moelink", path)
    return None if spec is None else str(spec.origin or list(spec.submodule_search_locations or ()))


def _own_moelink(preloaded_from: str | None) -> None:
    """In a forked child whose sys.path is set: if its `moelink` is not the one the zygote imported, forget the
    zygote's moelink modules so that the child imports its own, as an exec'd start would."""
    if "moelink" in sys.modules and _moelink_on_path(sys.path) != preloaded_from:
        for name in [n for n in sys.modules if n == "moelink" or n.startswith("moelink.")]:
            del sys.modules[name]


def _import_env(env: dict) -> dict:
    # TORCHINDUCTOR_CACHE_DIR aside: inductor reads it from os.environ at each use (cache_dir_utils.cache_dir), never
    # at import, and a forked child runs with its own environment. torch also writes its per-user default there the
    # first time anything asks for the cache dir, so a zygote started before that lacked it, a child's environment
    # copied after had it, and every such child was exec'd (32 of 43 server starts of a tests/server run; the
    # script shim, which has no torch to compute the default, too).
    return {k: v for k, v in env.items() if k.startswith(_IMPORT_ENV_PREFIXES) and k != "TORCHINDUCTOR_CACHE_DIR"}


# A script the tests run (benchmarks/gpu_session.sh) calls `$PYTHON -m ...`: given `shim_env()`, its $PYTHON is the
# shim, which has the zygote named here fork those too (tests/helpers/zygote_shim.py).
SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zygote_python")
SHIM_SOCKET, SHIM_PYTHON, SHIM_IMPORT_ENV = "MOELINK_ZYGOTE_SOCKET", "MOELINK_ZYGOTE_PYTHON", "MOELINK_ZYGOTE_IMPORT_ENV"
# A child whose environment names an interpreter here runs with it as sys.executable (taken out of its environment,
# so that its own children do not inherit it): a `ray start` whose Ray workers are to run through the shim
# (tests/helpers/zygote_ray.py `node_env`), as an exec'd one started by that interpreter would build them.
EXECUTABLE_ENV = "MOELINK_ZYGOTE_EXECUTABLE"


def real_python() -> str:
    """This process's interpreter: sys.executable, or the one the shim runs where sys.executable is the shim (a
    child started with EXECUTABLE_ENV; a zygote it starts must not run the shim, which would exec itself)."""
    return os.environ.get(SHIM_PYTHON, sys.executable) if sys.executable == SHIM else sys.executable


def spawn_at(path: str, module_argv: list[str], env: dict, cwd: str, fds: tuple[int, int, int],
             pgid: int | None = None, new_session: bool = False) -> tuple[int, socket.socket]:
    """Ask the zygote listening at `path` to fork `python -m ...` (module_argv; or `-c CODE ...`, or `- CODE ...` for
    code read from stdin) with these stdio fds, in process group `pgid` if given (else the zygote's), or in a session
    of its own (Popen's start_new_session): (its pid, the connection its exit status will arrive on)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    msg = json.dumps({"argv": module_argv, "env": env, "cwd": cwd, "pgid": pgid, "setsid": new_session}).encode()
    socket.send_fds(sock, [len(msg).to_bytes(8, "big") + msg], list(fds))
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk:
            sock.close()
            raise RuntimeError("the test zygote closed the connection before forking")
        reply += chunk
    return json.loads(reply)["pid"], sock


def shim_env() -> dict:
    """`_Zygote.shim_env` of this process's zygote (started if need be); {} where there is none (or it is off)."""
    z = _get() if os.environ.get(ENV_SWITCH, "1") != "0" else None
    return z.shim_env() if z is not None else {}


# -- the client side (the test process) ------------------------------------------------------------------------------
class ZygoteChild:
    """A process forked by the zygote, with the part of `subprocess.Popen`'s interface the tests use."""

    def __init__(self, args, pid: int, status_sock: socket.socket, stdout, stderr):
        self.args, self.pid, self._status = args, pid, status_sock
        self.stdout, self.stderr, self.stdin = stdout, stderr, None
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def _read_status(self, timeout: float | None) -> bool:
        with self._lock:
            if self.returncode is not None:
                return True
            ready, _, _ = select.select([self._status], [], [], timeout)
            if not ready:
                return False
            data = self._status.recv(64)
            self._status.close()
            # The zygote reports the wait status; a zygote gone without a word (killed) leaves it unknown.
            self.returncode = json.loads(data)["returncode"] if data else -signal.SIGKILL
            return True

    def poll(self) -> int | None:
        self._read_status(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._read_status(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, input=None, timeout: float | None = None):
        assert input is None, "communicate() writes no input to a zygote's child: write to its stdin"
        out = self.stdout.read() if self.stdout is not None else None
        err = self.stderr.read() if self.stderr is not None else None
        self.wait(timeout)
        return out, err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                f.close()
        self.wait()


class _Zygote:
    def __init__(self, env: dict | None = None):
        self.dir = tempfile.mkdtemp(prefix="moelink-zygote-")
        self.path = os.path.join(self.dir, "sock")
        self.env = ({**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if env is None
                    else dict(env))
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        # Run as a script, not `-m tests.helpers.zygote`: a child must not find the `tests` package already
        # imported (an exec'd `python -m` elsewhere would not).
        self.proc = subprocess.Popen([real_python(), os.path.abspath(__file__), self.path], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, cwd=root)
        line = self.proc.stdout.readline()  # bounded: the zygote prints it once imported, or exits
        self.proc.stdout.close()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"the test zygote did not start: {line!r}")
        self.import_env = _import_env(self.env)
        self.lock = threading.Lock()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def spawn(self, args, module_argv: list[str], env: dict, cwd: str, fds: tuple[int, int, int],
              new_session: bool = False) -> tuple[int, socket.socket]:
        return spawn_at(self.path, module_argv, env, cwd, fds, new_session=new_session)

    def shim_env(self) -> dict:
        """What a script's environment needs for its `$PYTHON -m ...` to be forked here too (zygote_shim.py)."""
        return {"PYTHON": SHIM, SHIM_SOCKET: self.path, SHIM_PYTHON: real_python(),
                SHIM_IMPORT_ENV: json.dumps(self.import_env, sort_keys=True)}

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()
        try:
            os.unlink(self.path)
            os.rmdir(self.dir)
        except OSError:
            pass


_zygote: _Zygote | None = None
_zygote_lock = threading.Lock()
starts = {"zygote": 0, "exec": 0}  # what this process started each way (the suite's summary line)


def _get() -> _Zygote | None:
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive():
            try:
                _zygote = _Zygote()
                atexit.register(_zygote.close)
            except Exception:  # no zygote: every start execs, as before
                _zygote = None
        return _zygote


def start_for(env: dict) -> _Zygote | None:
    """A zygote of its own whose imports see `env` (for scripts whose environment differs from this process's in
    what an import reads, e.g. HF_HUB_OFFLINE): the caller hands its `shim_env()` to them and closes it. None where
    zygotes are off or it cannot start (the scripts then exec as before)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        return _Zygote(env)
    except Exception:
        return None


def _fd(spec, mode: str, default_null: bool) -> tuple[int, object | None, bool]:
    """(fd to hand over, the parent's end to keep or None, whether to close fd after handing it over)."""
    if spec is None:
        return (os.open(os.devnull, os.O_RDWR), None, True) if default_null else (-1, None, False)
    if spec == subprocess.DEVNULL:
        return os.open(os.devnull, os.O_RDWR), None, True
    if spec == subprocess.PIPE:
        r, w = os.pipe()
        return (w, r, True) if mode == "r" else (r, w, True)
    if isinstance(spec, int):
        return spec, None, False
    return spec.fileno(), None, False


def popen(cmd, *, stdout=None, stderr=None, stdin=None, env=None, cwd=None, text=False, zygote: bool = True,
          fork_code: bool = False, start_new_session: bool = False, **kw):
    """`subprocess.Popen(cmd, ...)`, forked from the zygote when `cmd` is `[sys.executable, "-m", module, ...]` (or,
    with `fork_code`, `[sys.executable, "-c", code, ...]`: code that imports torch, which an exec'd start imports
    again) and the environment allows (module docstring)."""
    env = dict(os.environ if env is None else env)
    use = (zygote and os.environ.get(ENV_SWITCH, "1") != "0" and not kw and stdin in (None, subprocess.DEVNULL, subprocess.PIPE)
           and isinstance(cmd, (list, tuple)) and len(cmd) >= 3 and cmd[0] == sys.executable
           and (cmd[1] == "-m" or (fork_code and cmd[1] == "-c"))
           and not (stderr == subprocess.STDOUT and stdout is None))
    z = _get() if use else None
    if z is None or _import_env(env) != z.import_env:
        starts["exec"] += 1
        env.pop(EXECUTABLE_ENV, None)  # (an exec'd child's sys.executable is the interpreter it runs)
        return subprocess.Popen(cmd, stdout=stdout, stderr=stderr, stdin=stdin, env=env, cwd=cwd, text=text,
                                start_new_session=start_new_session, **kw)
    ours = []
    fd_in, keep_in, close_in = _fd(stdin, "w", True)
    fd_out, keep_out, close_out = _fd(stdout, "r", False)
    fd_err, keep_err, close_err = (fd_out, None, False) if stderr == subprocess.STDOUT else _fd(stderr, "r", False)
    # None: the child writes where this process does (as Popen's inherit).
    fds = (fd_in, fd_out if fd_out >= 0 else sys.stdout.fileno(), fd_err if fd_err >= 0 else sys.stderr.fileno())
    try:
        pid, status = z.spawn(cmd, list(cmd[1:]), env, os.path.abspath(cwd or os.getcwd()), fds, start_new_session)
    finally:
        for fd, close in ((fd_in, close_in), (fd_out, close_out), (fd_err, close_err)):
            if close:
                os.close(fd)
    for keep in (keep_out, keep_err):
        ours.append(None if keep is None else
                    (io.open(keep, "r", encoding="utf-8", errors="replace") if text else io.open(keep, "rb")))
    starts["zygote"] += 1
    child = ZygoteChild(cmd, pid, status, ours[0], ours[1])
    if keep_in is not None:  # stdin=PIPE: ours to write, closed for its EOF (as Popen's)
        child.stdin = io.open(keep_in, "w", encoding="utf-8") if text else io.open(keep_in, "wb")
    return child


def run(cmd, *, capture_output: bool = False, timeout: float | None = None, check: bool = False, text: bool = False,
        env=None, cwd=None, stdout=None, stderr=None, zygote: bool = True,
        fork_code: bool = False) -> subprocess.CompletedProcess:
    """`subprocess.run` over `popen` (capture_output, timeout, check as there)."""
    if capture_output:
        stdout = stderr = subprocess.PIPE
    proc = popen(cmd, stdout=stdout, stderr=stderr, env=env, cwd=cwd, text=text, zygote=zygote, fork_code=fork_code)
    if not isinstance(proc, ZygoteChild):
        with proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
    else:
        out, err = _collect(proc, timeout)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def _collect(proc: ZygoteChild, timeout: float | None):
    """Read both pipes to their ends (threads: either may fill while the other is read), then the exit status."""
    got: dict = {}
    threads = [threading.Thread(target=lambda k=k, f=f: got.__setitem__(k, f.read()), daemon=True)
               for k, f in (("out", proc.stdout), ("err", proc.stderr)) if f is not None]
    for t in threads:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        proc.wait(timeout)
        for t in threads:
            t.join(None if deadline is None else max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        for f in (proc.stdout, proc.stderr):
            if f is not None and not any(t.is_alive() for t in threads):
                f.close()
    return got.get("out"), got.get("err")


# -- the zygote itself -----------------------------------------------------------------------------------------------
def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while len(msg) < 8 or len(msg) < 8 + int.from_bytes(msg[:8], "big"):
        more = conn.recv(1 << 20)
        if not more:
            raise EOFError
        msg += more
    return json.loads(msg[8:8 + int.from_bytes(msg[:8], "big")]), list(fds)


def _join_group(pid: int, pgid: int | None) -> None:
    """Put the child in the requester's process group (a Ray worker's shim: the raylet made it a group of its own
    and cleans a worker up by that group), from both sides of the fork as a shell does (whichever runs first);
    a group that is gone or in another session leaves the child in a group of its own, never in the zygote's (the
    test process's: a raylet's kill of the group must not reach it)."""
    if pgid is None:
        return
    try:
        os.setpgid(pid, pgid)
    except OSError:
        with contextlib.suppress(OSError):
            os.setpgid(pid, 0)


def _become_child(req: dict, fds: list[int], base_path: list[str], moelink_from: str | None) -> None:
    """In the forked child: take the request's stdio, environment, directory and argv, then run the module (or the
    `-c` code)."""
    if req.get("setsid"):
        os.setsid()
    _join_group(0, req.get("pgid"))
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as CPython sets it at start-up
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(req["env"])
    executable = os.environ.pop(EXECUTABLE_ENV, None)
    if executable:
        sys.executable = executable
    os.chdir(req["cwd"])
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))

    def stream(fd: int, write: bool):
        raw = io.FileIO(fd, "w" if write else "r", closefd=False)
        if not write:
            return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8", errors="strict")
        buf = io.BufferedWriter(raw)
        return io.TextIOWrapper(buf, encoding="utf-8", errors="backslashreplace" if fd == 2 else "strict",
                                line_buffering=fd == 2 or os.isatty(fd), write_through=unbuffered)

    sys.stdin, sys.stdout, sys.stderr = stream(0, False), stream(1, True), stream(2, True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [req["cwd"], *extra, *base_path]
    _own_moelink(moelink_from)
    # Python's start-up imports `sitecustomize` from the path; the zygote's own start-up imported its own (if any),
    # so a child whose PYTHONPATH brings one (tests/helpers/interpreter_site: the faster Triton interpreter) imports
    # that one now, as its exec'd start-up would.
    if any(os.path.isfile(os.path.join(p, "sitecustomize.py")) for p in extra):
        sys.modules.pop("sitecustomize", None)
        import sitecustomize  # noqa: F401
    argv = req["argv"]
    if argv[0] == "-c":  # `python -c CODE ...`, as CPython runs it
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""  # the working directory, as CPython puts it first for -c
        main = type(sys)("__main__")
        sys.modules["__main__"] = main
        exec(compile(argv[1], "<string>", "exec", dont_inherit=True), main.__dict__)  # not this module's __future__
        return
    if argv[0] == "-":  # `python - ...`: the code the shim read from stdin, run as CPython runs stdin's
        sys.argv = ["-", *argv[2:]]
        sys.path[0] = ""
        main = type(sys)("__main__")
        sys.modules["__main__"] = main
        exec(compile(argv[1], "<stdin>", "exec", dont_inherit=True), main.__dict__)
        return
    assert argv[0] == "-m"
    sys.argv = [argv[1], *argv[2:]]  # runpy replaces argv[0] with the module's file
    sys.modules.pop(argv[1], None)  # preloaded (PRELOAD_OPTIONAL): runpy would run a second copy, and warn
    import runpy

    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


def _serve(path: str) -> int:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for name, attrs in PRELOAD_ATTRS:  # a lazy module's classes: each getattr imports the submodule that holds it
        for attr in attrs:
            getattr(sys.modules[name], attr, None)
    moelink_from = _moelink_on_path(sys.path)
    for name in PRELOAD_OPTIONAL:
        try:
            importlib.import_module(name)
        except ImportError:  # not importable here: the child imports what it needs
            pass
    # Everything imported so far moves to the collector's permanent generation: a child's collections (its exit's
    # included) no longer walk torch's objects, which a forked child's exit spent ~0.4 s of CPU on (a `pass`
    # child: 0.59 s before, 0.21 s after); nothing is freed or finalized differently (Python's advice for forking
    # servers, gc.freeze).
    import gc

    gc.freeze()
    base_path = [p for p in sys.path[1:] if p not in os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    parent = os.getppid()  # checked every second: the zygote ends with the test process that started it
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket] = {}
    print("ready", flush=True)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)  # nobody reads the pipe after "ready"
    os.close(null)
    while True:
        ready, _, _ = select.select([listener, wake_r], [], [], 1.0)
        if os.getppid() != parent:  # the test process is gone: leave at once, no interpreter shutdown to wait on
            os._exit(0)
        if wake_r in ready:
            os.read(wake_r, 4096)
        while children:  # reap: report each child's status on its connection
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
                except OSError:
                    pass
                conn.close()
        if listener in ready:
            conn, _ = listener.accept()
            try:
                req, fds = _recv_request(conn)
            except Exception:
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                try:
                    listener.close()
                    for c in children.values():
                        c.close()
                    conn.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    signal.set_wakeup_fd(-1)
                    _become_child(req, fds, base_path, moelink_from)
                except SystemExit:
                    raise  # the module's own exit: the interpreter shuts down as `python -m` would
                except KeyboardInterrupt:  # uncaught: CPython then ends by SIGINT (exit status -2)
                    traceback.print_exc()
                    sys.stderr.flush()
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    os.kill(os.getpid(), signal.SIGINT)
                    raise SystemExit(130)
                except BaseException:
                    traceback.print_exc()
                    raise SystemExit(1)
                raise SystemExit(0)
            if not req.get("setsid"):
                _join_group(pid, req.get("pgid"))
            for fd in fds:
                os.close(fd)
            children[pid] = conn
            try:
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1]))
