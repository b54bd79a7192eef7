"""Where a `make test` run's time went, from its junit file (`make test PYTEST_ARGS=--junitxml=OUT.xml`).

    python -m tests.helpers.junit_times OUT.xml [--by file|dir|test] [--top N] [--idle SAMPLES]

Per file (or folder, or test function): junit's wall seconds, the tests' CPU seconds in their pytest process
(tests/helpers/run_records.py records `cpu_s` per test: every thread of the worker, not its subprocesses) and the count. A row
whose CPU is far over its cost run alone, or whose wall is far over its CPU without subprocesses to explain it, was
slowed by something beside it (docs/testing.md: a worker left on two threads made such rows ~5x their cost alone).
With `--idle SAMPLES` (a run with MOELINK_TEST_CPU_SAMPLES=SAMPLES, tests/helpers/cpu_samples.py): the idle
core-seconds while each key's tests ran, largest first.
"""
from __future__ import annotations

import argparse
import os
import collections
import xml.etree.ElementTree as ET


def key_of(classname: str, name: str, by: str) -> str:
    parts = classname.split(".")
    if by == "dir":
        return "/".join(parts[:2])
    module = "/".join(p for p in parts if not p[:1].isupper()) + ".py"  # drop a test class's name
    return module if by == "file" else f"{module}::{name.split('[')[0]}"


def idle_by_key(path: str, samples_path: str, by: str = "file") -> tuple[collections.Counter, float, float]:
    """Idle core-seconds per key while its tests ran (tests/helpers/cpu_samples.py), shared equally among the tests
    running at each sampled second; also the run's idle core-seconds with no test running, and in all."""
    import bisect

    from tests.helpers.cpu_samples import read

    per_worker: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for case in ET.parse(path).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if "t0" not in props:
            continue
        t0 = float(props["t0"])
        per_worker[props.get("worker", "main")].append(
            (t0, t0 + float(case.get("time", 0) or 0), key_of(case.get("classname", ""), case.get("name", ""), by)))
    starts = {w: [iv[0] for iv in sorted(ivs)] for w, ivs in per_worker.items()}
    for w in per_worker:
        per_worker[w].sort()
    samples = read(samples_path)
    cores = float(os.cpu_count() or 1)
    idle: collections.Counter = collections.Counter()
    outside = total = 0.0
    for (t_prev, _), (t, busy) in zip([(samples[0][0] - 1.0, 0.0)] + samples[:-1], samples):
        free = max(cores - busy, 0.0) * (t - t_prev)
        total += free
        mid = (t + t_prev) / 2
        running = []
        for w, ivs in per_worker.items():
            i = bisect.bisect_right(starts[w], mid) - 1
            if i >= 0 and ivs[i][1] >= mid:
                running.append(ivs[i][2])
        if not running:
            outside += free
        for k in running:
            idle[k] += free / len(running)
    return idle, outside, total


def summarize(path: str, by: str = "file") -> list[tuple[str, float, float, float, int]]:
    """(key, wall seconds, CPU seconds, whole-tree CPU seconds (0 without MOELINK_TEST_CGROUPS=1), tests), largest
    wall first."""
    wall: collections.Counter = collections.Counter()
    cpu: collections.Counter = collections.Counter()
    tree: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for case in ET.parse(path).getroot().iter("testcase"):
        k = key_of(case.get("classname", ""), case.get("name", ""), by)
        wall[k] += float(case.get("time", 0) or 0)
        count[k] += 1
        for prop in case.iter("property"):
            if prop.get("name") == "cpu_s":
                cpu[k] += float(prop.get("value", 0) or 0)
            elif prop.get("name") == "tree_cpu_s":
                tree[k] += float(prop.get("value", 0) or 0)
    return [(k, w, cpu[k], tree[k], count[k]) for k, w in wall.most_common()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("junit")
    ap.add_argument("--by", choices=("file", "dir", "test"), default="file")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--sort", choices=("wall", "tree"), default="wall", help="tree: by the CPU of each key's whole "
                    "process tree (a run with MOELINK_TEST_CGROUPS=1)")
    ap.add_argument("--idle", metavar="SAMPLES", help="tests/helpers/cpu_samples.py's file of the same run: rank by "
                    "the idle core-seconds while each key's tests ran")
    args = ap.parse_args(argv)
    if args.idle:
        idle, outside, total = idle_by_key(args.junit, args.idle, args.by)
        print(f"{'idle s':>8}  ({total:.0f} idle core-seconds in the run, {outside:.0f} of them with no test running)")
        for k, v in idle.most_common(args.top):
            print(f"{v:8.1f}  {k}")
        return
    rows = summarize(args.junit, args.by)
    if args.sort == "tree":
        rows.sort(key=lambda r: -r[3])
    print(f"{'wall s':>8} {'cpu s':>8} {'tree s':>8} {'tests':>6}  ({sum(r[1] for r in rows):.0f} s wall, "
          f"{sum(r[2] for r in rows):.0f} s CPU, {sum(r[3] for r in rows):.0f} s tree CPU, {sum(r[4] for r in rows)} "
          f"tests)")
    for k, w, c, t, n in rows[:args.top]:
        print(f"{w:8.1f} {c:8.1f} {t:8.1f} {n:6d}  {k}")


if __name__ == "__main__":
    main()
