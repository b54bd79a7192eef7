"""The type check's configuration (pyproject's [tool.mypy], tests/helpers/typecheck.py; docs/testing.md#the-type-check)
still catches what it is there for: an import of a name a moelink module does not have, at module level and inside
an unannotated function's body (the CUDA-only path where kernels/triton_moe_tiny.py once imported a name
kernels/split_planning.py did not have: an ImportError on every GPU launch, never run on CPU). `make test` checks the
whole package and this small file beside it in one mypy run."""
from __future__ import annotations


import re
import sys
import textwrap

import pytest

from tests.helpers import typecheck

PROBE = textwrap.dedent('''\
    from moelink.kernels.split_planning import num_sms, no_such_name


    def launch(device):  # unannotated: checked only with check_untyped_defs
        if device.type == "cuda":
            from moelink.kernels.split_planning import also_missing

            return also_missing(device.index)
        return num_sms(0)


    def gpu_only(index):
        import moelink.kernels.split_planning as planning

        return planning.missing_attribute(index)
    ''')


@pytest.fixture(scope="module")
def checked():
    """One mypy run over the whole package and the probe beside it: (the package's error lines, the probe's error
    lines by line, mypy's whole output). One run, not two: a second run on the first one's cache still spent ~20 s
    of CPU reading torch's cached types again (junit, 2026-11-25). The probe is a top-level module on the link
    tree's path (mypy takes packages and modules, or files, not both), removed after."""
    probe = typecheck.link_tree() / "typecheck_probe.py"
    probe.write_text(PROBE)
    try:
        out, err, status = typecheck.run_isolated("-p", "moelink", "-m", "typecheck_probe")
    finally:
        probe.unlink()
    checked = re.search(r"\(checked (\d+) source files\)|Success: no issues found in (\d+) source files", out)
    assert status in (0, 1) and checked is not None, f"mypy did not run (status {status}):\n{out}{err}"
    # Every module of the package was checked, not the probe alone.
    assert int(checked.group(1) or checked.group(2)) > 400, out
    errors = [line for line in out.splitlines() if ": error: " in line]
    mine = [line for line in errors if probe.name in line.split(": error: ", 1)[0]]
    # The probe's errors by line number.
    return [e for e in errors if e not in mine], [e.split(f"{probe.name}:", 1)[1] for e in mine], out + err


@pytest.mark.slow  # ~40 s of CPU cold; `make test-quick` runs the check before its tests instead
@pytest.mark.xdist_group("typecheck")
def test_the_whole_package_type_checks(checked):
    """`make test`'s type check: mypy over the whole package, GPU-only code included (docs/testing.md#the-type-check).
    A test rather than a step before pytest so that its minute of CPU runs on one worker beside the other's tests
    (tests/conftest.py schedules it first)."""
    package_errors, _, output = checked
    assert package_errors == [], f"mypy found errors (make typecheck shows the same):\n{output}"
    # mypy ran in a child: its build (millions of objects) never joins this worker's heap, which every engine start
    # after it collects (typecheck.run_isolated).
    assert "mypy.build" not in sys.modules, "mypy ran inside the pytest worker: use typecheck.run_isolated"


@pytest.mark.xdist_group("typecheck")
def test_a_missing_name_of_a_moelink_module_fails_the_check(checked):
    _, probe_errors, output = checked
    # Only these three: the module resolved (no "Cannot find implementation"), num_sms exists.
    assert probe_errors == [
        '1: error: Module "moelink.kernels.split_planning" has no attribute "no_such_name"  [attr-defined]',
        '6: error: Module "moelink.kernels.split_planning" has no attribute "also_missing"  [attr-defined]',
        '15: error: Module has no attribute "missing_attribute"  [attr-defined]',
    ], output


def test_the_link_tree_is_the_package_dir_mapping():
    """Each root folder pyproject maps to a `moelink.<sub>` is linked once (the nested entries follow their parent)."""
    dirs = typecheck.package_dirs()
    assert dirs == {"engine": "engine", "scheduler": "scheduler", "moe": "moe", "comm": "comm", "kernels": "kernels",
                    "benchmarks": "benchmarks", "planner": "planner"}
    links = typecheck.link_tree() / "moelink"
    assert {p.name: p.resolve() for p in links.iterdir()} == {s: typecheck.ROOT / f for s, f in dirs.items()}


def _skip_patterns() -> tuple[list[str], list[str]]:
    """pyproject's mypy overrides: (module patterns mypy does not follow, patterns read again inside those)."""
    import tomllib

    overrides = tomllib.loads((typecheck.ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["overrides"]
    skipped = [m for o in overrides if o.get("follow_imports") == "skip" for m in o["module"]]
    read = [m for o in overrides if o.get("follow_imports") == "normal" for m in o["module"]]
    return skipped, read


def _matches(name: str, pattern: str) -> bool:
    """mypy's override matching: `a.b.*` is a.b and every module under it; otherwise the exact name."""
    if pattern.endswith(".*"):
        return name == pattern[:-2] or name.startswith(pattern[:-1])
    return name == pattern


def _unread(name: str, skipped: list[str], read: list[str]) -> bool:
    """Whether mypy leaves `name` unread: it, or the longest module above it that an override names (an attribute
    chain `torch._dynamo.config` starts with its module), is skipped and not read again by a more specific pattern."""
    parts = name.split(".")
    for prefix in (".".join(parts[:i]) for i in range(len(parts), 0, -1)):
        if any(_matches(prefix, p) for p in read):
            return False
        if any(_matches(prefix, p) for p in skipped):
            return True
    return False


def test_no_module_mypy_skips_is_named_by_moelink():
    """The modules pyproject tells mypy not to follow (docs/testing.md#the-type-check) are those moelink never names:
    a name read from one would be Any, unchecked. Every dotted name in the package's source that starts with a top
    package of those overrides (imports, `torch._dynamo.x`, strings like "transformers.models.x.y") is checked, and
    every module an import statement names (`import rich` too)."""
    skipped, read = _skip_patterns()
    assert skipped and read, "pyproject's mypy overrides changed shape: update this test"
    tops = sorted({p.split(".")[0] for p in skipped})
    dotted = re.compile(r"\b((?:%s)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)" % "|".join(map(re.escape, tops)))
    # and every module an import statement names, dotted or not (`import rich`, `from pydantic import X`)
    imports = re.compile(r"^\s*(?:import|from)\s+((?:%s)\b[\w.]*)" % "|".join(map(re.escape, tops)), re.M)
    named, imported = set(), set()
    for folder in typecheck.package_dirs().values():
        for path in (typecheck.ROOT / folder).rglob("*.py"):
            text, where = path.read_text(), str(path.relative_to(typecheck.ROOT))
            named.update((m.group(1), where) for m in dotted.finditer(text))
            imported.update((m.group(1), where) for m in imports.finditer(text))
    assert len(named) > 20, named  # the scan sees moelink's torch / transformers / ray names
    assert any(n == "torch" for n, _ in imported), imported  # and its plain `import torch`
    bad = sorted((name, where) for name, where in named | imported if _unread(name, skipped, read))
    assert bad == [], f"moelink names modules pyproject's mypy overrides skip (read them: add to the normal list): {bad}"


def test_the_skip_guard_sees_a_skipped_name():
    """The guard above is not vacuous: names under a skipped model package or torch compiler count as unread, the
    model packages moelink reads and torch's core do not."""
    skipped, read = _skip_patterns()
    assert _unread("transformers.models.mixtral.modeling_mixtral", skipped, read)
    assert _unread("torch._dynamo.config.cache_size_limit", skipped, read)
    assert _unread("ray.data.Dataset", skipped, read)
    assert not _unread("transformers.models.qwen3_moe.modeling_qwen3_moe", skipped, read)
    assert not _unread("transformers.models.auto.configuration_auto.CONFIG_MAPPING", skipped, read)
    assert not _unread("transformers.models", skipped, read)  # its star imports carry the read packages' names
    assert not _unread("torch.nn.functional", skipped, read)
