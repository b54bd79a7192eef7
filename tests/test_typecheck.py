"""The type check's configuration (pyproject's [tool.mypy], tests/helpers/typecheck.py; docs/testing.md#the-type-check)
still catches what it is there for: an import of a name a moelink module does not have, at module level and inside
an unannotated function's body (the CUDA-only path where kernels/triton_moe_tiny.py once imported a name
kernels/split_planning.py did not have: an ImportError on every GPU launch, never run on CPU). `make test` checks the
whole package first; this checks one small file against it, on that run's cache (a second or two)."""
from __future__ import annotations

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


@pytest.mark.slow  # a minute of CPU cold; `make test-quick` runs the check before its tests instead
@pytest.mark.xdist_group("typecheck")
def test_the_whole_package_type_checks():
    """`make test`'s type check: mypy over the whole package, GPU-only code included (docs/testing.md#the-type-check).
    A test rather than a step before pytest so that its minute of CPU runs on one worker beside the other's tests
    (tests/conftest.py schedules it first); the probe below then runs on its cache, on the same worker."""
    out, err, status = typecheck.run()
    assert status == 0, f"mypy found errors (make typecheck shows the same):\n{out}{err}"


@pytest.mark.xdist_group("typecheck")
def test_a_missing_name_of_a_moelink_module_fails_the_check(tmp_path):
    probe = tmp_path / "typecheck_probe.py"
    probe.write_text(PROBE)
    out, err, status = typecheck.run(str(probe))
    assert status == 1, out + err
    # The file's errors by line (mypy may name the probe by the path its cache saw first: another tmp_path).
    errors = [line.split(f"{probe.name}:", 1)[1] for line in out.splitlines() if ": error: " in line]
    # Only these three: the module resolved (no "Cannot find implementation"), num_sms exists.
    assert errors == [
        '1: error: Module "moelink.kernels.split_planning" has no attribute "no_such_name"  [attr-defined]',
        '6: error: Module "moelink.kernels.split_planning" has no attribute "also_missing"  [attr-defined]',
        '15: error: Module has no attribute "missing_attribute"  [attr-defined]',
    ], out + err


def test_the_link_tree_is_the_package_dir_mapping():
    """Each root folder pyproject maps to a `moelink.<sub>` is linked once (the nested entries follow their parent)."""
    dirs = typecheck.package_dirs()
    assert dirs == {"engine": "engine", "scheduler": "scheduler", "moe": "moe", "comm": "comm", "kernels": "kernels",
                    "benchmarks": "benchmarks", "planner": "planner"}
    links = typecheck.link_tree() / "moelink"
    assert {p.name: p.resolve() for p in links.iterdir()} == {s: typecheck.ROOT / f for s, f in dirs.items()}
