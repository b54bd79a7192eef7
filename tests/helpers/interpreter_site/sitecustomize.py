"""Installs tests/helpers/fast_interpreter.py in a Python the tests start with TRITON_INTERPRET=1 (its env from
`fast_interpreter.interpreter_env`, which puts this directory on PYTHONPATH; Python imports `sitecustomize` at start-up)."""
import importlib.util
import os

if os.environ.get("TRITON_INTERPRET") == "1":
    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fast_interpreter.py")
    _spec = importlib.util.spec_from_file_location("_moelink_fast_interpreter", _path)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    _module.install()
