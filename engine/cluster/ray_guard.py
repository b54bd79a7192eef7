"""Clean-up of a Ray instance that moelink started for itself, even when moelink is SIGKILLed.

    python ray_guard.py TEMP_DIR PARENT_PID      (started by `LocalRay`, never by hand)

A local Ray lives in a temp dir of its own (sessions, logs, sockets). Ray's GCS and raylet die
with the process that started them (PR_SET_PDEATHSIG), but the agents the raylet starts
(ray::DashboardAgent, ray::RuntimeEnvAgent) outlived a SIGKILLed `moelink serve` by about a
minute, and session folders piled up under /tmp/ray, after clean exits too.

The guard is a small process started next to Ray, in a session of its own (so Ctrl-C or a
SIGTERM to the server's process group does not reach it: the server may be draining). It waits
until the server is gone — EOF on its stdin, a pipe whose other end only the server holds, or
its parent process changing — then stops every process that has a file open under TEMP_DIR or
names it on its command line (the processes of this Ray instance, and no others: every Ray
process keeps its logs there) and removes TEMP_DIR. On a clean exit the server shuts Ray down
itself, then closes the pipe, and the guard only checks for stragglers and removes the folder.

While it waits it also watches the instance's raylet. A raylet that dies (killed, OOM) while the server
lives leaves the instance useless (the server's health turns NOT_SERVING), but its ray::Worker processes,
a model's weights each (1.1 GB each under EP 3), lived on until the server stopped. So once the raylet it
saw is gone, the guard stops every process of the instance but the server at once, and removes the folder
when the server goes, as before. The server names the raylet on the guard's stdin (`raylet PID`) once Ray is
up, so a raylet that dies a moment after start is not missed; a worker still alive after SIGTERM's grace is
SIGKILLed by identity (PID and start time) even once it has closed its files in the folder.

No imports beyond the standard library: it must start in milliseconds and outlive anything.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import time

_TERM_GRACE_S = 0.5


def processes_using(temp_dir: str, exclude: tuple[int, ...] = ()) -> list[int]:
    """PIDs of this user's processes that have a file open under `temp_dir` or name it in their arguments
    (never this process, nor those in `exclude`)."""
    prefix = os.path.realpath(temp_dir).rstrip("/") + "/"
    needle = temp_dir.encode()
    uid = os.getuid()
    skip = {os.getpid(), *exclude}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        proc = f"/proc/{entry}"
        try:
            if os.stat(proc).st_uid != uid:
                continue
            with open(f"{proc}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
                    continue
            for fd in os.listdir(f"{proc}/fd"):
                try:
                    target = os.readlink(f"{proc}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(prefix):
                    found.append(int(entry))
                    break
        except OSError:  # gone, or not ours to look at
            continue
    return found


def clean(temp_dir: str, exclude: tuple[int, ...] = (), grace_s: float = _TERM_GRACE_S) -> int:
    """Stop the processes of the Ray instance in `temp_dir` (SIGTERM, then SIGKILL) and remove it;
    returns how many there were. `exclude`: PIDs to leave alone (the server, on a clean exit)."""
    pids = stop_processes(temp_dir, exclude, grace_s)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return len(pids)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def raylet_of(temp_dir: str, exclude: tuple[int, ...] = ()) -> int | None:
    """The PID of the raylet of the Ray instance in `temp_dir` (its program is named `raylet`), or None."""
    for pid in processes_using(temp_dir, exclude):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0]
        except OSError:
            continue
        if os.path.basename(argv0) == b"raylet":
            return pid
    return None


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has exited


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (stat field 22): with the PID, an identity that a
    recycled PID does not share."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None else None


_RAYLET_LOOKUP_S = 2.0  # between /proc scans for the raylet when the parent has not named it (a scan reads every fd)
_RESWEEP_S = 2.0  # after a sweep, between checks for processes of the dead instance still there


def wait_for_parent(parent_pid: int, temp_dir: str | None = None) -> None:
    """Return once the parent is gone: EOF on stdin (or stdin closed), or a new parent process. With
    `temp_dir`, meanwhile stop the instance's processes (but the parent) when its raylet dies.

    The parent names the raylet on stdin (a line `raylet PID`) as soon as Ray is up, so a raylet killed a
    moment after start is still seen to die; until then the guard looks for it in /proc itself."""
    stdin = sys.stdin.fileno()
    raylet, next_lookup, swept_at, pending = None, 0.0, None, b""
    while os.getppid() == parent_pid:
        try:
            ready, _, _ = select.select([stdin], [], [], 0.5)
            if ready:
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    named = _named_raylet(line)
                    if named is not None and swept_at is None:
                        raylet = named
        except OSError:
            return
        if temp_dir is None:
            continue
        if swept_at is not None:
            # A worker busy in its own shutdown can outlive one sweep: sweep what is left, now and then.
            if time.monotonic() - swept_at >= _RESWEEP_S:
                stop_processes(temp_dir, exclude=(parent_pid,))
                swept_at = time.monotonic()
            continue
        if raylet is None:
            if time.monotonic() >= next_lookup:
                found = raylet_of(temp_dir, (parent_pid,))
                raylet = (found, _start_time(found)) if found is not None else None
                next_lookup = time.monotonic() + _RAYLET_LOOKUP_S
        elif not _alive(raylet[0]) or _start_time(raylet[0]) != raylet[1]:
            stop_processes(temp_dir, exclude=(parent_pid,))
            swept_at = time.monotonic()  # the instance is gone; what is left is the parent's to end


def _named_raylet(line: bytes) -> tuple[int, str | None] | None:
    """`raylet PID` from the parent -> (PID, its start time), or None for anything else."""
    parts = line.split()
    if len(parts) == 2 and parts[0] == b"raylet" and parts[1].isdigit():
        pid = int(parts[1])
        return pid, _start_time(pid)
    return None


def stop_processes(temp_dir: str, exclude: tuple[int, ...] = (), grace_s: float = _TERM_GRACE_S) -> list[int]:
    """SIGTERM the processes of the Ray instance in `temp_dir`, then SIGKILL those still there; their PIDs.

    "Still there" is by identity (PID and start time), not by what the process still has open: a Ray worker
    whose raylet is gone closes its log files on SIGTERM and then waits on the dead raylet (a loaded 2-core
    machine, seconds), so a second scan of the folder no longer finds it although it lives on."""
    found = {pid: _start_time(pid) for pid in processes_using(temp_dir, exclude)}
    for pid in found:
        _signal(pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    left = dict(found)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = {pid: t for pid, t in left.items() if _alive(pid) and _start_time(pid) == t}
    stragglers = set(left) | set(processes_using(temp_dir, exclude))  # and anything started meanwhile
    for pid in stragglers:
        _signal(pid, signal.SIGKILL)
    return list(found)


def main(argv: list[str]) -> int:
    temp_dir, parent_pid = argv[0], int(argv[1])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the parent's exit ends the watch
    wait_for_parent(parent_pid, temp_dir)
    clean(temp_dir, exclude=(parent_pid,))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
