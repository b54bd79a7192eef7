"""tests/helpers/zygote.py: a `python -m` forked from the zygote behaves as the exec'd one in what the tests read
(argv, working directory, environment, sys.path, stdout/stderr, exit status, signals), and falls back to a plain
exec where the environment differs in what an import of torch reads."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests.helpers import zygote

PROBE = [sys.executable, "-m", "tests.helpers.zygote_probe"]


def test_a_forked_child_sees_what_an_execd_one_sees(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PROBE": "yes", "OMP_NUM_THREADS": "1", "PYTHONPATH": root}  # `tests` from another cwd
    got = []
    for fork in (True, False):
        r = zygote.run(PROBE + ["show", "x y"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
                       zygote=fork)
        assert r.returncode == 0 and r.stderr.strip().endswith("to stderr"), r.stderr
        seen = json.loads(r.stdout)
        got.append((seen.pop("ppid"), seen))
    (zparent, forked), (eparent, execd) = got
    assert forked == execd and forked["argv"][1:] == ["show", "x y"] and forked["cwd"] == str(tmp_path)
    assert forked["env"] == "yes" and forked["threads"] == 1 and forked["name"] == "__main__"
    assert eparent == os.getpid() and zparent != os.getpid()  # the zygote is the forked one's parent


def test_exit_status_exceptions_and_signals_are_popens():
    assert zygote.run(PROBE + ["exit", "3"], timeout=60).returncode == 3
    r = zygote.run(PROBE + ["fail"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "ValueError: boom" in r.stderr
    p = zygote.popen(PROBE + ["sleep"], stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert isinstance(p, zygote.ZygoteChild)
    assert p.stdout.readline().split() == ["up", str(p.pid)] and p.poll() is None
    try:
        p.wait(0.2)
        raise AssertionError("the sleeper exited")
    except subprocess.TimeoutExpired:
        pass
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == -signal.SIGTERM
    p.stdout.close()


def test_another_thread_count_or_a_non_module_command_execs():
    before = dict(zygote.starts)
    zygote.run(PROBE + ["exit", "0"], env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=60)
    zygote.run([sys.executable, "-c", "pass"], timeout=60)
    assert zygote.starts["exec"] == before["exec"] + 2 and zygote.starts["zygote"] == before["zygote"]
    # An HF_* variable transformers reads at import (the zygote imported it) execs too; inductor's cache dir, which
    # torch writes into this process's environment on first use and reads at each use, does not.
    zygote.run(PROBE + ["exit", "0"], env={**os.environ, "HF_HUB_CACHE": "/nonexistent"}, timeout=60)
    assert zygote.starts["exec"] == before["exec"] + 3
    r = zygote.run(PROBE + ["show"], env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": "/tmp/elsewhere"},
                   capture_output=True, text=True, timeout=60)
    assert zygote.starts["exec"] == before["exec"] + 3 and json.loads(r.stdout)["ppid"] == zygote._get().proc.pid


def test_a_scripts_python_shim_forks_module_runs_and_ends_as_the_child_ended(tmp_path):
    """zygote_shim.py: a shell script's `$PYTHON -m ...` (benchmarks/gpu_session.sh under tests/helpers/
    gpu_session.py) is forked by the zygote, its output, exit code and end by a signal the plain run's; so is
    `-c CODE` that imports torch or moelink, with CPython's argv and path; other code, stdin's or a file's, execs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PROBE": "yes", "OMP_NUM_THREADS": "1", "PYTHONPATH": root, **zygote.shim_env()}
    assert env["PYTHON"] == zygote.SHIM

    def script(cmd: str, **kw):
        return subprocess.run(["bash", "-c", cmd], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              **kw)

    r = script('"$PYTHON" -m tests.helpers.zygote_probe show "x y"')
    seen = json.loads(r.stdout)
    assert r.returncode == 0 and seen["argv"][1:] == ["show", "x y"] and seen["cwd"] == str(tmp_path)
    assert seen["env"] == "yes" and r.stderr.strip().endswith("to stderr")
    assert seen["ppid"] == zygote._get().proc.pid  # forked by the zygote, not exec'd by the shim
    assert script('"$PYTHON" -m tests.helpers.zygote_probe exit 3').returncode == 3
    assert "ValueError: boom" in script('"$PYTHON" -m tests.helpers.zygote_probe fail').stderr
    # A signal to the shim (as `timeout` sends one) reaches the child, and the shim ends by it too.
    r = script('"$PYTHON" -m tests.helpers.zygote_probe sleep > up & for i in $(seq 600); do grep -q up up && break; '
               'sleep 0.05; done; kill -TERM $!; wait $!; echo "status $?"')  # signalled once it is up (<= 30 s)
    assert r.stdout.split()[-2:] == ["status", str(128 + signal.SIGTERM)], r.stdout + r.stderr
    zpid = zygote._get().proc.pid
    show = "import os, sys, torch; print(sys.flags.no_site, sys.argv, repr(sys.path[0]), __name__, os.getppid() == {})"
    r = script(f'"$PYTHON" -c "{show.format(zpid)}" a "b c"')  # with site, as a plain python -c
    first = r.stdout.split("\n")[0]
    assert r.returncode == 0 and first == f"0 ['-c', 'a', 'b c'] '' __main__ True", r.stdout + r.stderr
    assert script('"$PYTHON" -c "import sys, torch; sys.exit(4)"').returncode == 4
    r = script('"$PYTHON" -c "from __future__ import annotations; import torch; raise ValueError(\'boom\')"')
    assert r.returncode == 1 and "ValueError: boom" in r.stderr, r.stderr
    # No __future__ flag of the zygote's own module leaks into the code it runs.
    assert script('"$PYTHON" -c "import torch\ndef f(x: int): pass\nassert f.__annotations__ == {\'x\': int}"'
                  ).returncode == 0
    # The code on stdin that names torch (gpu_session.sh's heredocs): forked too, as CPython runs `-`.
    r = script(f"\"$PYTHON\" - a 'b c' <<'EOF'\n{show.format(zpid)}\nEOF\n")
    assert r.returncode == 0 and r.stdout.split("\n")[0] == f"0 ['-', 'a', 'b c'] '' __main__ True", r.stdout + r.stderr
    r = script("\"$PYTHON\" - transformers <<'EOF'\nimport sys\nraise SystemExit(sys.argv[1] + ' boom')\nEOF\n")
    assert r.returncode == 1 and r.stderr.strip() == "transformers boom", r.stderr
    # Code that names neither torch nor moelink (-c or stdin) and a script file: the real interpreter.
    not_forked = f"import os; print(os.getppid() == {zpid})"
    (tmp_path / "probe.py").write_text(not_forked + "\n")
    for cmd in (f'"$PYTHON" -c "{not_forked}"', f"\"$PYTHON\" - <<'EOF'\n{not_forked}\nEOF\n", '"$PYTHON" probe.py'):
        r = script(cmd)
        assert r.returncode == 0 and r.stdout.strip() == "False", (cmd, r.stdout + r.stderr)

def test_a_forked_child_imports_the_sitecustomize_its_pythonpath_brings(tmp_path):
    """Python's start-up imports `sitecustomize` from PYTHONPATH (tests/helpers/interpreter_site: the faster Triton
    interpreter in the children the tests start); a forked child does the same."""
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['PROBE'] = 'from sitecustomize'\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), root])}
    for fork in (True, False):
        r = zygote.run(PROBE + ["env"], capture_output=True, text=True, env=env, timeout=60, zygote=fork)
        assert json.loads(r.stdout)["env"] == "from sitecustomize", (fork, r.stderr)


def test_a_child_with_another_moelink_on_its_path_imports_that_one(tmp_path):
    """The zygote preloads moelink's serving modules (PRELOAD_OPTIONAL): a plain child starts with them, and a child
    whose PYTHONPATH brings another `moelink` package (a worktree's link tree) gets that one, as an exec'd start."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    plain = zygote.run(PROBE + ["moelink"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root})
    seen = json.loads(plain.stdout)
    assert seen["served"] and seen["ppid"] == zygote._get().proc.pid, plain.stderr
    (tmp_path / "moelink").mkdir()
    (tmp_path / "moelink" / "__init__.py").write_text("")
    other = zygote.run(PROBE + ["moelink"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), root])})
    seen = json.loads(other.stdout)
    assert seen["moelink"] == str(tmp_path / "moelink" / "__init__.py") and not seen["served"], other.stderr
    assert seen["ppid"] == zygote._get().proc.pid  # still forked: only moelink's modules were dropped
    # A `-m` child of a preloaded module runs a fresh copy as __main__, as an exec'd start (runpy warns otherwise).
    cli = zygote.run([sys.executable, "-m", "moelink.engine.api.cli", "--help"], capture_output=True, text=True,
                     timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cli.returncode == 0 and "usage" in cli.stdout and cli.stderr == "", cli.stderr


def test_the_preloaded_moelink_modules_import_no_optional_dependency_and_read_no_environment():
    """The zygote's moelink preload imports none of the optional dependencies a child may lack or have hidden (a
    fresh interpreter imports them and lists what it has); and none of those modules reads the environment at
    import (module level, class bodies, default values), or a child's own setting would be missed. Reads inside
    functions (lambdas included) happen in the child and are fine."""
    import ast
    import importlib

    code = ("import sys, importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in zygote.PRELOAD_OPTIONAL)
            + "print(sorted({n.split('.')[0] for n in sys.modules}))")
    tops = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    optional = sorted(set(eval(tops.stdout)) & set(zygote.OPTIONAL_DEPENDENCIES))
    assert optional == [], f"the zygote's preload imports optional dependencies a child may lack: {optional}"
    for name in zygote.PRELOAD_OPTIONAL:
        importlib.import_module(name)
    modules = [m for n, m in sorted(sys.modules.items()) if n.startswith("moelink") and getattr(m, "__file__", None)]
    assert len(modules) > 100, len(modules)
    reads = []

    def scan(node, path):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for d in [*child.args.defaults, *child.args.kw_defaults, *child.decorator_list]:
                    if d is not None:
                        scan(ast.Expression(d), path)
                continue
            if isinstance(child, ast.Lambda):
                continue
            if isinstance(child, (ast.Subscript, ast.Call)):
                src = ast.unparse(child.value if isinstance(child, ast.Subscript) else child.func)
                if src in ("os.environ", "os.getenv", "os.environ.get", "environ.get", "getenv"):
                    reads.append(f"{path}:{child.lineno} {ast.unparse(child)[:80]}")
            scan(child, path)

    for m in modules:
        with open(m.__file__) as f:
            scan(ast.parse(f.read()), m.__name__)
    assert reads == [], reads
