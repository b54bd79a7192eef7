"""The engine core drives schedulers through scheduler/interface.py: Scheduler implements every member with
the protocol's parameters."""
from __future__ import annotations

import inspect

from moelink.scheduler.interface import SchedulerInterface
from moelink.scheduler.scheduler import Scheduler


def members(cls) -> dict[str, object]:
    return {n: v for n, v in vars(cls).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}


def test_scheduler_implements_the_interface():
    init = inspect.getsource(Scheduler.__init__)
    for name, declared in members(SchedulerInterface).items():
        impl = inspect.getattr_static(Scheduler, name, None)
        if isinstance(declared, property):
            # A property of the protocol: a property of the scheduler, or an attribute its __init__ sets.
            assert isinstance(impl, property) or f"self.{name} =" in init or f"self.{name}:" in init, name
            continue
        assert callable(impl), name
        assert list(inspect.signature(impl).parameters) == list(inspect.signature(declared).parameters), name


def test_the_engine_uses_nothing_beyond_it():
    """Every scheduler attribute read in the engine core is a member of the interface."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "engine"
    used = set()
    for f in ("core/llm_engine.py", "cluster/elastic.py", "cluster/rejoin.py", "core/input_processing.py"):
        used |= set(re.findall(r"\b(?:sched|schedulers\[[^\]]+\]|s)\.([a-z_]+)\b", (root / f).read_text()))
    known = set(members(SchedulerInterface))
    scheduler_like = used & set(dir(Scheduler)) | used & known
    assert scheduler_like <= known, sorted(scheduler_like - known)
