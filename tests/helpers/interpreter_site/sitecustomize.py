"""Installs tests/helpers/fast_interpreter.py in a Python the tests start with TRITON_INTERPRET=1 (its env from
`fast_interpreter.interpreter_env`, which puts this directory on PYTHONPATH; Python imports `sitecustomize` at start-up).

With MOELINK_FAST_INTERPRETER=1 instead (`fast_interpreter.lazy_interpreter_env`: benchmarks/gpu_session.sh's
children, which set TRITON_INTERPRET themselves, after start-up), it is installed when Triton imports its
interpreter, which it does only once TRITON_INTERPRET=1 (install() checks), so nothing is imported earlier."""
import importlib.util
import os
import sys


def _install() -> None:
    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fast_interpreter.py")
    _spec = importlib.util.spec_from_file_location("_moelink_fast_interpreter", _path)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    _module.install()


class _OnInterpreterImport:
    """A meta-path finder that runs `_install` right after triton.runtime.interpreter is executed (then leaves)."""

    NAME = "triton.runtime.interpreter"

    def find_spec(self, name, path=None, target=None):
        if name != self.NAME:
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            sys.modules[name] = module  # what install() imports is this module, already executed
            _install()

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("TRITON_INTERPRET") == "1":
    _install()
elif os.environ.get("MOELINK_FAST_INTERPRETER") == "1":
    sys.meta_path.insert(0, _OnInterpreterImport())
