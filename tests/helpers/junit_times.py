"""Where a `make test` run's time went, from its junit file (`make test PYTEST_ARGS=--junitxml=OUT.xml`).

    python -m tests.helpers.junit_times OUT.xml [--by file|dir|test] [--top N]

Per file (or folder, or test function): junit's wall seconds, the tests' CPU seconds in their pytest process
(tests/conftest.py records `cpu_s` per test: every thread of the worker, not its subprocesses) and the count. A row
whose CPU is far over its cost run alone, or whose wall is far over its CPU without subprocesses to explain it, was
slowed by something beside it (docs/testing.md: a worker left on two threads made such rows ~5x their cost alone).
"""
from __future__ import annotations

import argparse
import collections
import xml.etree.ElementTree as ET


def key_of(classname: str, name: str, by: str) -> str:
    parts = classname.split(".")
    if by == "dir":
        return "/".join(parts[:2])
    module = "/".join(p for p in parts if not p[:1].isupper()) + ".py"  # drop a test class's name
    return module if by == "file" else f"{module}::{name.split('[')[0]}"


def summarize(path: str, by: str = "file") -> list[tuple[str, float, float, int]]:
    """(key, wall seconds, CPU seconds, tests), largest wall first."""
    wall: collections.Counter = collections.Counter()
    cpu: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for case in ET.parse(path).getroot().iter("testcase"):
        k = key_of(case.get("classname", ""), case.get("name", ""), by)
        wall[k] += float(case.get("time", 0) or 0)
        count[k] += 1
        for prop in case.iter("property"):
            if prop.get("name") == "cpu_s":
                cpu[k] += float(prop.get("value", 0) or 0)
    return [(k, w, cpu[k], count[k]) for k, w in wall.most_common()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("junit")
    ap.add_argument("--by", choices=("file", "dir", "test"), default="file")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args(argv)
    rows = summarize(args.junit, args.by)
    print(f"{'wall s':>8} {'cpu s':>8} {'tests':>6}  ({sum(r[1] for r in rows):.0f} s wall, "
          f"{sum(r[2] for r in rows):.0f} s CPU, {sum(r[3] for r in rows)} tests)")
    for k, w, c, n in rows[:args.top]:
        print(f"{w:8.1f} {c:8.1f} {n:6d}  {k}")


if __name__ == "__main__":
    main()
