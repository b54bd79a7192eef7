"""Every GPU-only block of the package is named in docs/gpu-session-steps.md with what runs it (issue 55 item 4).

The static finder (tests/helpers/coverage_map.py, AST only, ~1 s) lists the blocks that run only on CUDA; the page's
section "GPU-only code: where it runs" has one table per module with such code, one row per qualified name, saying
the CPU test that reaches it through a stand-in or the GPU step of benchmarks/gpu_session.sh that runs it, or that
nothing runs it. A new GPU-only block (a `torch.cuda` call, a `device.type == "cuda"` branch, a compiled-only arm of
a Triton kernel, ...) fails here until its row is written; a row whose block is gone fails too."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from tests.helpers import coverage_map as cm
from tests.helpers import coverage_ray

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "gpu-session-steps.md"
SECTION = "## GPU-only code: where it runs"
NOT_RUN = "not run anywhere"
MODULE_HEADING = re.compile(r"^### `([^`]+\.py)`\s*$")
ROW = re.compile(r"^\| `([^`]+)` \|(.*)\|(.*)\|\s*$")


def doc_rows(text: str) -> dict[str, dict[str, str]]:
    """{module: {qualified name: its "runs in" cell}} from the section's tables."""
    assert SECTION in text, f"{DOC.name} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows: dict[str, dict[str, str]] = {}
    module = None
    for line in section.splitlines():
        m = MODULE_HEADING.match(line)
        if m:
            module = m.group(1)
            rows.setdefault(module, {})
            continue
        if line.startswith("#"):
            module = None  # another heading (the lists after the tables)
            continue
        m = ROW.match(line)
        if m and module is not None:
            rows[module][m.group(1)] = m.group(3).strip()
    return rows


def unnamed(blocks: dict[str, list[cm.Block]], rows: dict[str, dict[str, str]]) -> list[str]:
    return [f"{module}: {q}" for module, bs in blocks.items() for q in cm.qualnames(bs) if q not in rows.get(module, {})]


def gpu_steps() -> set[str]:
    """The step names benchmarks/gpu_session.sh accepts (its main `case`), and `first`."""
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    m = re.search(r"^  (tests-kernels\|[a-z0-9|-]+)\) ;;$", script, re.M)
    assert m, "benchmarks/gpu_session.sh's step list moved: update gpu_steps()"
    return set(m.group(1).split("|")) | {"first", "preflight"}


@pytest.fixture(scope="module")
def blocks():
    return cm.find_blocks()


@pytest.fixture(scope="module")
def rows():
    return doc_rows(DOC.read_text())


def test_every_gpu_only_block_is_named_in_the_doc(blocks, rows):
    missing = unnamed(blocks, rows)
    assert not missing, (
        f"GPU-only blocks that docs/gpu-session-steps.md ({SECTION[3:]}) does not name: {missing}. Add a row "
        "`| `Qualified.name` | why | runs in |` under the module's heading: the CPU test that reaches it through a "
        f"stand-in, or the GPU step that runs it (benchmarks/gpu_session.sh), or '{NOT_RUN}' (and say why)")


def test_the_doc_names_no_block_that_is_gone(blocks, rows):
    stale = [f"{module}: {q}" for module, names in rows.items() for q in names
             if q not in cm.qualnames(blocks.get(module, []))]
    assert not stale, f"docs/gpu-session-steps.md names GPU-only blocks the finder no longer sees: {stale}"


def _resolved(names: dict[str, str], cell: str) -> str:
    """A cell that reads "as `Other.name` ..." says what Other.name's row says (same module), and its own words."""
    m = re.match(r"as `?([\w.<>]+)`?", cell)
    return names.get(m.group(1), "") + " " + cell if m and m.group(1) in names else cell


def test_each_row_says_what_runs_it(rows):
    steps = gpu_steps()
    bad = []
    for module, names in rows.items():
        for q, own in names.items():
            cell = _resolved(names, own)
            named_steps = re.findall(r"`([a-z][a-z0-9-]*)(?: [^`]*)?`", own)
            gpu = [s for s in re.findall(r"`([a-z][a-z0-9-]*)(?: [^`]*)?`", cell) if s in steps]
            unknown = [s for s in named_steps if s not in steps and s not in ("make", "moelink")]
            cpu = "tests/" in cell
            if unknown:
                bad.append(f"{module}: {q}: `{'`, `'.join(unknown)}` is no step of benchmarks/gpu_session.sh")
            if not (gpu or cpu or NOT_RUN in cell):
                bad.append(f"{module}: {q}: says neither a GPU step, a CPU test, nor '{NOT_RUN}'")
    assert not bad, "\n".join(bad)


def test_the_not_run_list_holds_every_not_run_row(rows):
    text = DOC.read_text()
    listed = text.split("### Not run anywhere", 1)[1].split("\n### ", 1)[0] if "### Not run anywhere" in text else ""
    missing = [f"{module}: {q}" for module, names in rows.items() for q, cell in names.items()
               if NOT_RUN in cell and f"`{q}`" not in listed]
    assert not missing, f"rows marked '{NOT_RUN}' that the section's 'Not run anywhere' list leaves out: {missing}"


# -- the finder itself ---------------------------------------------------------------------------------------------------
def _find(src: str) -> list[tuple[str, str, int, int]]:
    return [(b.qualname, b.kind, b.start, b.end) for b in cm.find_blocks_in_source(textwrap.dedent(src), "m.py")]


def test_the_finder_sees_each_kind_of_gpu_only_block():
    src = '''
        import torch

        class Runner:
            def __init__(self, device):
                self._cuda = device.type == "cuda"
                self.stream: torch.cuda.Stream | None = None   # an annotation runs nothing

            def step(self, x):
                if self._cuda:                                  # a flag set from a CUDA test
                    x = x + 1
                if not self._cuda:
                    return x
                torch.cuda.synchronize()                        # after the CPU's early return
                return x

        def sms(device):
            if device.type != "cuda":
                return 4
            return torch.cuda.get_device_properties(device.index).multi_processor_count

        def plain(device):
            n = 16 if device.type == "cpu" else 64
            try:
                y = torch.empty(n, device=device)
            except torch.cuda.OutOfMemoryError:
                y = None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("asked for CUDA on a CPU machine")   # runs on CPU: not a CUDA branch
            return y

        def _load_nccl():
            return 1
        '''
    got = _find(src)
    assert ("Runner.step", "branch", 11, 11) in got
    assert ("Runner.step", "tail", 14, 15) in got
    assert ("sms", "tail", 20, 20) in got
    assert ("plain", "expr", 23, 23) in got
    assert ("plain", "except", 27, 27) in got
    assert ("_load_nccl", "def", 33, 33) in got  # its body: the def line runs at import
    assert not [g for g in got if g[0] == "Runner.__init__"], got
    assert not [g for g in got if g[0] == "plain" and g[1] == "branch"], got


def test_the_finder_sees_the_interpreter_and_whole_functions():
    src = '''
        import torch

        def kernel(x, INTERPRET):
            if INTERPRET:
                return x
            else:
                return x * 2

        def config(t, interp):
            return (16, 4) if interp else (64, 8)

        def name(index):
            return torch.cuda.get_device_name(index)
        '''
    got = _find(src)
    assert ("kernel", "else", 8, 8) in got
    assert ("config", "expr", 11, 11) in got
    assert ("name", "function", 14, 14) in got


def test_a_new_unnamed_block_fails_the_check(blocks, rows):
    """What the first test reports when someone adds a GPU-only block: the module and the qualified name."""
    new = cm.find_blocks_in_source("import torch\ndef fresh():\n    torch.cuda.synchronize()\n", "engine/new.py")
    assert unnamed({**blocks, "engine/new.py": new}, rows) == ["engine/new.py: fresh"]


def test_the_finder_covers_the_package(blocks):
    """The finder reads every module of the package (the generated stubs aside) and finds the known blocks."""
    files = {p.relative_to(ROOT).as_posix() for p in cm.package_files()}
    assert "engine/rank/cuda_graph.py" in files and not any(f.startswith("engine/server/gen/") for f in files)
    assert "CudaGraphCapture.capture" in cm.qualnames(blocks["engine/rank/cuda_graph.py"])
    assert "NcclAllToAll" in cm.qualnames(blocks["comm/nccl_all_to_all.py"])


# -- make coverage's plumbing ---------------------------------------------------------------------------------------------
def test_the_ray_hook_does_nothing_outside_a_measured_ray_worker():
    assert not coverage_ray.start(["/usr/bin/python", "-c"])
    assert coverage_ray.is_ray_worker([".../ray/_private/workers/default_worker.py", "--node-ip-address=x"])
    line = cm.pth_line()
    assert line.startswith("import os;") and line.count("\n") == 1 and "COVERAGE_PROCESS_CONFIG" in line


def test_the_ray_hook_traces_actor_threads():
    """Each executor Ray makes sets the tracer on a thread that has none, and keeps Ray's attributes."""
    import sys
    import threading
    from types import SimpleNamespace

    class FunctionActorManager:
        def _make_actor_method_executor(self, method_name, method):
            def executor(actor, *args):
                return method(actor, *args)

            executor.name, executor.method = method_name, method
            return executor

    seen = []

    def install(frame, event, arg):
        seen.append(event)
        sys.settrace(None)
        return None

    assert coverage_ray.trace_actor_threads(SimpleNamespace(FunctionActorManager=FunctionActorManager), install)
    ex = FunctionActorManager()._make_actor_method_executor("ping", lambda actor, x: x + 1)
    assert ex.name == "ping" and ex.method is not None
    out = []

    def ray_thread():  # a thread with no trace function, as Ray's C++-made ones are (even under make coverage)
        sys.settrace(None)
        out.append(ex(None, 1))

    t = threading.Thread(target=ray_thread)
    t.start()
    t.join()
    assert out == [2] and seen, "the executor did not install the tracer on its thread"


def test_the_coverage_map_marks_missed_lines_inside_gpu_blocks():
    block = cm.Block("m.py", "f", "branch", 3, 4, "if x.is_cuda")
    data = {"files": {"m.py": {"executed_lines": [1, 2, 6], "missing_lines": [3, 4, 5],
                               "summary": {}}},
            "totals": {"num_statements": 6, "covered_lines": 3, "percent_covered": 50.0}}
    result = cm.coverage_map(data, {"m.py": [block]})
    m = result["modules"]["m.py"]
    assert m["missed"] == 3 and m["missed_in_gpu_blocks"] == 2
    assert m["missed_ranges"] == [{"start": 3, "end": 4, "gpu_block": "f (branch)"},
                                  {"start": 5, "end": 5, "gpu_block": None}]
    assert m["gpu_blocks"][0]["state"] == "never run on CPU"
    assert "3-4 [GPU: f (branch)], 5" in cm.map_markdown(result)
