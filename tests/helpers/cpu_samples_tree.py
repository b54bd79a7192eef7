"""The CPU of a whole process tree, for the suite's own measurements (tests/helpers/run_records.py, MOELINK_TEST_CGROUPS=1).

`enter(name)` puts this process in a new cgroup-v1 `cpuacct` group (root only); every process it starts from then on
is in it too, also those that leave its process tree by daemonizing (Ray's GCS, raylet and workers, servers), so
`usage()` is the CPU of everything the worker set going, in seconds. The group is removed at exit (its processes moved
back to the root group first). Without cgroup v1 `cpuacct` nothing happens and `active()` stays false.
"""
from __future__ import annotations

import atexit
import os

ROOT = "/sys/fs/cgroup/cpuacct"
_group: str | None = None


def active() -> bool:
    return _group is not None


def enter(name: str) -> None:
    global _group
    path = os.path.join(ROOT, name)
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        return
    _group = path
    atexit.register(_leave)


def usage() -> float:
    assert _group is not None
    with open(os.path.join(_group, "cpuacct.usage")) as f:
        return int(f.read()) / 1e9


def _leave() -> None:
    if _group is None:
        return
    try:
        with open(os.path.join(_group, "cgroup.procs")) as f:
            pids = f.read().split()
        for pid in pids:
            try:
                with open(os.path.join(ROOT, "cgroup.procs"), "w") as f:
                    f.write(pid)
            except OSError:
                pass
        os.rmdir(_group)
    except OSError:
        pass
