"""Coverage of Ray's worker processes (the EP/TP ranks) under `make coverage` (docs/testing.md#coverage).

coverage.py measures every Python the suite starts (`patch = subprocess` in pyproject.toml: its .pth file starts
coverage in each new interpreter). A Ray worker escapes it twice, and this file, run at the start of every measured
Ray worker, mends both:
- Ray runs an actor's methods on threads its C++ core made (one pool per concurrency group: the rank's `Worker` has
  two), which Python 3.11 gives no trace function (coverage reaches new threads through `threading.settrace`, which
  sees only threads the threading module starts). Each actor method executor Ray makes
  (`FunctionActorManager._make_actor_method_executor`) is wrapped so that the first call on a thread installs
  coverage's tracer there (its collector's `_installation_trace`, what `threading.settrace` would have set).
- Ray ends its workers from C++ (a quick exit, or the raylet's kill): no Python exit hook runs, so coverage never
  saves. A thread saves the data every `EVERY_S` seconds (coverage's flush copies the tracers' sets, so a save
  beside running threads is safe); what a rank runs in its last seconds before the kill (its shutdown) may be lost.

`make coverage` executes this file from a one-line .pth file it writes into the virtualenv's site-packages
(`python -m tests.helpers.coverage_map pth`), after coverage's own .pth, in every Python that starts with
COVERAGE_PROCESS_CONFIG set; it does nothing outside a Ray worker or where coverage is not running. Only the
standard library is imported here: it runs at the start of every measured process. Both mends lean on internals
(coverage's collector, Ray's executor factory): where either has moved, nothing is patched and the ranks' lines
simply count as missed.
"""
import os
import sys
import threading
import time

EVERY_S = 2.0
RAY_MODULE = "ray._private.function_manager"


def is_ray_worker(argv: list[str]) -> bool:
    return bool(argv) and os.path.basename(argv[0]) == "default_worker.py"


def _save_loop(cov, every_s: float) -> None:
    while True:
        time.sleep(every_s)
        try:
            cov.save()
        except Exception:  # a failed save is retried at the next tick; the worker must never notice
            pass


def trace_actor_threads(module, install_trace) -> bool:
    """Wrap `module.FunctionActorManager._make_actor_method_executor` so each executor it makes sets
    `install_trace` as the trace function of a thread that has none before running the method."""
    manager = getattr(module, "FunctionActorManager", None)
    make = getattr(manager, "_make_actor_method_executor", None)
    if make is None or getattr(make, "_moelink_traced", False):
        return False

    def make_traced(self, method_name, method):
        executor = make(self, method_name, method)

        def traced_executor(__ray_actor, *args, **kwargs):
            if sys.gettrace() is None:
                sys.settrace(install_trace)
            return executor(__ray_actor, *args, **kwargs)

        traced_executor.__dict__.update(executor.__dict__)  # Ray reads .name and .method off the executor
        return traced_executor

    make_traced._moelink_traced = True
    manager._make_actor_method_executor = make_traced
    return True


class _AfterImport:
    """A meta-path finder that calls `then(module)` right after module `name` is executed (then leaves)."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, then = spec.loader.exec_module, self.then

        def exec_module(module):
            run(module)
            try:
                then(module)
            except Exception:
                pass

        spec.loader.exec_module = exec_module
        return spec


def start(argv: list[str] | None = None, every_s: float = EVERY_S) -> bool:
    """In a Ray worker that coverage measures: the actor threads traced and the saving thread started. True if so."""
    if not is_ray_worker(sys.argv if argv is None else argv) or "coverage" not in sys.modules:
        return False
    cov = sys.modules["coverage"].Coverage.current()
    if cov is None or getattr(cov, "_moelink_ray", False):  # (a .pth file may run twice: site-packages twice on
        return False                                        # sys.path, as coverage's own notes say)
    cov._moelink_ray = True
    install_trace = getattr(getattr(cov, "_collector", None), "_installation_trace", None)
    if install_trace is not None:
        if RAY_MODULE in sys.modules:
            trace_actor_threads(sys.modules[RAY_MODULE], install_trace)
        else:
            sys.meta_path.insert(0, _AfterImport(RAY_MODULE, lambda m: trace_actor_threads(m, install_trace)))
    threading.Thread(target=_save_loop, args=(cov, every_s), name="coverage-save", daemon=True).start()
    return True


if __name__ == "moelink_coverage_ray":  # executed from the .pth file (tests.helpers.coverage_map.PTH_LINE)
    start()
