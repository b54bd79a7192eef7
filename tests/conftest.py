"""Shared fixtures: tiny random Hugging Face checkpoints built once per session; sockets listening; the heap kept
frozen from a module's first engine start on (engines_keep_heap_frozen).

And the `slow` marker for every test that uses a fixture starting processes (the rest is marked where it
is defined: Ray tests, network namespaces, anything over ~5 s). `pytest -m "not slow"` is the quick loop.
Under `--dist loadgroup`: the xdist groups (the Ray tests on one worker, in an order that lets consecutive modules
share one local Ray), and the Ray settings of every Ray the tests start.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from tests.helpers import net
from tests.helpers.tiny_configs import TINY_CONFIGS

# What each test and the run cost, and how many processes it started: tests/helpers/run_records.py.
pytest_plugins = ["tests.helpers.run_records"]


# Torch's intra-op threads: `make test` runs three pytest-xdist workers on the 2-core machines, so one thread
# each. Two each oversubscribe the cores, and the OpenMP barriers of the tiny models' many small ops then spin
# against the other worker: the same preemption parity test took 75 s with 2 threads and 10 s with 1.
torch.set_num_threads(int(os.environ.get("MOELINK_TEST_THREADS", "1")))
# The same for what the tests start (servers, benchmark and session-script subprocesses) unless a test says.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every Ray the tests start (ray.init here, `ray start` and servers in subprocesses) runs its workers, the EP ranks,
# at nice 0 as the engine's own local Ray does (engine/cluster/ray_runtime.py): at Ray's default 15 they starved
# behind the other xdist worker's CPU-bound test past the 10 s heartbeat timeout.
os.environ.setdefault("RAY_worker_niceness", "0")
# How long such a Ray waits after SIGTERM before it SIGKILLs a worker it kills (ray.kill: every engine shutdown, a
# recovery dropping a lost rank): Ray's default 5 s is waited out in full by a rank that cannot act on SIGTERM, a
# frozen (SIGSTOP) one or one blocked in a collective with a dead peer, and the next engine waits for its CPUs. A
# worker that can exit exits well within 1 s, so nothing the tests check changes; a frozen-rank test took 4 s less.
os.environ.setdefault("RAY_kill_worker_timeout_milliseconds", "1000")


# Fixtures that start processes: a `moelink serve` subprocess (tests/server), EP rank processes (tests/comm),
# a Ray (tests/ep). A test using one, even indirectly (e.g. `stubs` → `server`), is slow.
SLOW_FIXTURES = {"server", "spawn_server", "ep_launch", "local_ray", "ray_tmpdir"}


# Tests that start a Ray cluster (tests/ep, tests/deploy, or a Ray fixture). `make test` runs the suite on two
# pytest-xdist workers; these all go to one of them (`--dist loadgroup`), so two Ray heads never start at
# once: two concurrent starts on 2 cores time out in raylet/GCS start-up.
RAY_DIRS = ("tests/ep/", "tests/deploy/")
RAY_FIXTURES = {"local_ray", "ray_tmpdir"}


# A module whose tests share a fixture set up once per module (or class: EP rank processes launched once for
# all the module's cases, a server, an engine) runs on one worker as well: spread over both, each worker
# would set that fixture up again (10-20 s each for the launches of tests/comm).
SHARED_SCOPES = ("module", "class", "package")


# Module-scoped fixtures that share nothing costly to set up again (a check, a gc setting): no reason to group.
_GROUP_MODULES = os.environ.get("MOELINK_TEST_GROUP_MODULES", "0") == "1"

UNGROUPED_FIXTURES = {"no_nixl_agent_left_open", "heap_held_frozen", "engines_keep_heap_frozen"}


def _uses_shared_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.items() if info is not None else ()
    return any(d[-1].scope in SHARED_SCOPES for name, d in defs if d and name not in UNGROUPED_FIXTURES)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
        path = str(item.path).replace(os.sep, "/")
        if RAY_FIXTURES & fixtures or any(d in path for d in RAY_DIRS):
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif item.get_closest_marker("xdist_group") is None and (_GROUP_MODULES or _uses_shared_fixture(item)):
            item.add_marker(pytest.mark.xdist_group(os.path.relpath(item.path, item.config.rootpath)))
    if getattr(config.option, "loadgroup", False):  # a pytest-xdist worker under --dist loadgroup
        _schedule_order(items)
        _shared_ray_modules_first(items)
        _name_groups(items)


def _group(item) -> str | None:
    return next((str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")),
                None)


def _schedule_order(items) -> None:
    """The order the workers take the work in (`make test` passes --no-loadscope-reorder, so pytest-xdist keeps
    it): the whole-package type check first (a minute of CPU on one worker: last, it would run alone while the other
    workers idle), then the Ray group (the longest unit, on another worker), then the other groups, most tests
    first, then the ungrouped tests in collection order, which fill every worker to the end. Without the type check
    and its place this is pytest-xdist's own reordering (scopes by test count, stable)."""
    groups = [_group(it) for it in items]
    count: dict = {}
    for g in groups:
        count[g] = count.get(g, 0) + 1

    def key(i: int) -> tuple:
        g = groups[i]
        rank = 0 if g == "typecheck" else 1 if g == "ray" else 2 if g is not None else 3
        return rank, -count[g] if g is not None else 0, i

    order = sorted(range(len(items)), key=key)
    items[:] = [items[i] for i in order]


def _is_ray_item(item) -> bool:
    return any((m.args[0] if m.args else m.kwargs.get("name")) == "ray" for m in item.iter_markers("xdist_group"))


def _shared_ray_rank(module_items) -> int:
    """Where a module of the Ray group goes: 0 every test on the shared local Ray (tests/ep/conftest.py), 1 its first
    test on it, 2 its first test on it through a `local_ray` of the module's own (one that stops it, as
    test_ep_lifecycle.py's), 3 the rest (their own Rays, or none)."""
    first = module_items[0]
    if "shared_ray" not in first.fixturenames:
        return 3
    defs = first._fixtureinfo.name2fixturedefs.get("local_ray", ())
    if defs and defs[-1].baseid.endswith(".py"):  # defined in the test module itself
        return 2
    return 0 if all("shared_ray" in it.fixturenames for it in module_items) else 1


def _shared_ray_modules_first(items) -> None:
    """Reorder the Ray group, which --dist loadgroup hands to one worker as one block in this order: the modules on
    the shared local Ray first, back to back, so one Ray serves them all, instead of a stop and a new start (~6 s)
    wherever a module that starts its own Ray (or none) sat between two of them. Modules keep their tests' order
    and, within each rank, their own; every other test keeps its place. (Not in one process: there the group's
    slots are apart, and a module moved across the gap would be split in two.)"""
    slots = [i for i, it in enumerate(items) if _is_ray_item(it)]
    modules: dict = {}
    for i in slots:
        modules.setdefault(items[i].path, []).append(items[i])
    order = sorted(modules.values(), key=_shared_ray_rank)  # stable: collection order within a rank
    for i, it in zip(slots, [it for module in order for it in module]):
        items[i] = it


def _name_groups(items) -> None:
    """What pytest-xdist does on a worker for --dist loadgroup, for pytest versions where its own hook has no
    effect: a test's xdist_group names become the "@name" suffix of its node id, which is what the scheduler
    groups by. pytest-xdist sets `item._nodeid`; pytest 9 reads the node id from `item._id` instead, so the
    marks were ignored and every group (the Ray tests, the decode graphs, the modules above) was spread over
    both workers. Runs first (tryfirst), so pytest-xdist's hook sees the suffix already there."""
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        node_id = getattr(item, "_id", None)
        if not names or node_id is None or "@" in item.nodeid.rpartition("]")[2]:
            continue
        item._id = type(node_id).parse(f"{item.nodeid}@{'_'.join(names)}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(name) → path of that tiny checkpoint (built on first use)."""
    from moelink.engine.tools.tiny_model import make_tiny_model

    built: dict[str, str] = {}

    def get(name: str, **overrides) -> str:
        key = name + repr(sorted(overrides.items()))
        if key not in built:
            cfg = dict(TINY_CONFIGS[name], **overrides)
            out = tmp_path_factory.mktemp(name)
            built[key] = str(make_tiny_model(out, **cfg))
        return built[key]

    return get


@pytest.fixture(scope="session")
def hf_tiny_model(tmp_path_factory):
    """hf_tiny_model(name) → path of that checkpoint saved by transformers (tests.helpers.hf_checkpoints.HF_TINY;
    built on first use)."""
    from tests.helpers.hf_checkpoints import save_hf_checkpoint

    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = save_hf_checkpoint(tmp_path_factory.mktemp(name), name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def fp8_tiny(tmp_path_factory):
    """fp8_tiny(name, fused=False, block=BLOCK) → (float checkpoint saved by transformers, its `moelink
    quantize-fp8` copy in `block` blocks (16 x 16 by default), that copy dequantized to float64) for
    tests.helpers.fp8_checkpoints.FP8_TINY[name]."""
    from moelink.engine.tools.quantize_fp8 import quantize_checkpoint
    from tests.helpers.fp8_checkpoints import BLOCK, dequantized_copy, save_fp8_tiny

    built: dict = {}

    def get(name: str, fused: bool = False, block: tuple[int, int] = BLOCK):
        if (name, fused, block) not in built:
            root = tmp_path_factory.mktemp(name + ("_fused" if fused else "") + f"_{block[0]}x{block[1]}")
            src = save_fp8_tiny(root / "float", name, fused=fused)
            dst = str(quantize_checkpoint(src, root / "fp8", block))
            built[name, fused, block] = (src, dst, dequantized_copy(dst, root / "dequantized"))
        return built[name, fused, block]

    return get


@pytest.fixture(scope="session")
def listening():
    """listening(port=None, pids=None) → {(address, port)} of the TCP sockets listening on this host."""
    return net.listening


@pytest.fixture(autouse=True)
def torch_threads_unchanged(request):
    """Every test leaves torch's intra-op thread count as it found it (one per worker: above). A test that left it at
    2 (the built-in model's training smoke, through `train`'s `threads`) made every later test of its worker spin
    OpenMP barriers against the other worker: tests/engine/test_dsa_families.py took 85 s with two workers of two
    threads against 14 s with one each, and the suite's engine tests ran ~6x slow behind it. Restored here, and the
    test that changed it fails, naming what to do."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"{request.node.nodeid} left torch's intra-op threads at {after} (was {before}): restore them "
                    f"(torch.set_num_threads) where the code under test changes them", pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def no_nixl_agent_left_open():
    """Every module closes the NIXL agents it made (its connectors and transports): an agent left open keeps a UCX
    thread polling a core for the rest of the worker's tests (four did once, and the suite ran past CI's limit)."""
    yield
    import gc
    import sys

    nixl = sys.modules.get("moelink.engine.kv_transfer.nixl")
    if nixl is None:
        return
    left = nixl.open_agents()
    if left:  # maybe garbage not collected yet: collect only then (a full collection of a worker's unfrozen heap
        del left  # is ~0.25 s of CPU, and this ran after every module once any test had imported the transport)
        release_suite_freeze()  # garbage the suite kept frozen (engines_keep_heap_frozen) is collectable again
        gc.collect()
        left = nixl.open_agents()
    for a in left:
        a.close()
    assert not left, f"{len(left)} NIXL agent(s) left open by this module: close the connector or transport"


# The heap frozen by one module's engines stays frozen through the next KEEP_FROZEN_MODULES - 1 modules too (the
# suite's own holder below): each module end used to thaw it, so the next module's first engine start collected the
# worker's whole heap (~0.26 s of CPU, one per engine module, measured with a gc callback over 8 engine modules: 2.8 of
# their 88 CPU-s in full collections). What that keeps frozen is the garbage cycles of at most that many modules'
# engines (memory only: every engine is shut down by its test), freed at the next thaw. Released before a
# COLLECTOR_CHECKED module and by the NIXL guard before it collects (release_suite_freeze).
KEEP_FROZEN_MODULES = 4
_SUITE_HOLDER = object()
_modules_kept_frozen = [0]


def release_suite_freeze() -> None:
    """The suite's hold on the frozen heap ends now (the heap thaws unless an engine or module holds it)."""
    import sys

    gc_policy = sys.modules.get("moelink.engine.contract.gc_policy")
    _modules_kept_frozen[0] = 0
    if gc_policy is not None:
        gc_policy.thaw_heap(_SUITE_HOLDER)


@pytest.fixture(autouse=True, scope="module")
def engines_keep_heap_frozen(request):
    """From a module's first engine start to its end, the heap frozen at each engine start stays frozen (an engine's
    shutdown no longer thaws it: engine/contract/gc_policy.py), so each later start in the module collects only
    what is new since the one before, not the worker's whole heap (~0.3 s per start with the suite collected;
    the Ray tests' driver spent a quarter of its CPU there); and past its end for KEEP_FROZEN_MODULES - 1 more
    modules (above). Costs nothing before the first start: no collection here, only the module counted as a
    holder. Not in a module that sets `COLLECTOR_CHECKED = True` (one whose tests count on the collector: an engine
    given back on `del`, gc_policy's own tests): the heap is thawed before it."""
    if getattr(request.module, "COLLECTOR_CHECKED", False):
        release_suite_freeze()
        yield
        return
    from moelink.engine.contract import gc_policy

    token = object()
    with gc_policy._lock:  # a holder as freeze_heap adds one, without its collection now (no public seam for it)
        gc_policy._holders.add(id(token))
    yield
    if _modules_kept_frozen[0] < KEEP_FROZEN_MODULES - 1:
        with gc_policy._lock:
            gc_policy._holders.add(id(_SUITE_HOLDER))
        _modules_kept_frozen[0] += 1
    else:
        release_suite_freeze()
    gc_policy.thaw_heap(token)


@pytest.fixture(scope="module")
def heap_held_frozen():
    """The heap held frozen for a module, as a live engine holds it (engine/contract/gc_policy.py): every engine start
    in the module then collects only what was made since, not the test process's whole heap (0.1-0.5 s per engine in
    a suite worker). For modules that start many engines and check nothing that depends on the collector
    (`pytestmark = pytest.mark.usefixtures("heap_held_frozen")`)."""
    from moelink.engine.contract import gc_policy

    holder = object()
    gc_policy.freeze_heap(holder)
    yield
    gc_policy.thaw_heap(holder)
