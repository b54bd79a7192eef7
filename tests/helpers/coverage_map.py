"""The map of what the CPU suite never runs (issue 55 item 4; docs/gpu-session-steps.md#gpu-only-code-where-it-runs).

Two halves:
- a static finder (`find_blocks`, AST only, no import of the package): the GPU-only blocks of every module of the
  package, by qualified name: branches taken only on CUDA (`device.type == "cuda"`, `x.is_cuda`,
  `torch.cuda.is_available()`, a flag assigned from one of those; the other arm of `!= "cuda"`, `== "cpu"`, of the
  Triton interpreter's `interp` / `INTERPRET` / `TRITON_INTERPRET`, and the statements after such a test's early
  return), statements that call CUDA-only APIs (`torch.cuda.*` but `is_available` / `device_count`: streams,
  events, CUDA graphs, `mem_get_info`, capabilities; `pin_memory`, `.cuda()`, `device="cuda"`), handlers of
  `torch.cuda.OutOfMemoryError`, NCCL-only code (branches on `"nccl"`, functions and classes named for it), and
  the CUDA arms of conditional expressions (`x if device.type == "cuda" else y`; the compiled kernels' tile sizes
  beside the interpreter's: line coverage cannot tell those arms apart, listed as `expr`). tests/test_gpu_coverage_map.py holds docs/gpu-session-steps.md to naming each block.
- the map (`coverage_map`): `make coverage`'s coverage.json turned into, per module, the line ranges the CPU suite
  never ran, each marked with the GPU-only block it lies in, and the blocks the CPU suite did reach (through a
  stand-in, or because a CPU test drives that branch on purpose).

    python -m tests.helpers.coverage_map blocks [--json]   # the static finder's list
    python -m tests.helpers.coverage_map pth                # (make coverage) the Ray workers' hook, tests/helpers/coverage_ray.py
    python -m tests.helpers.coverage_map report [DIR]       # (make coverage) combine, report.txt, coverage.json, map.md
    python -m tests.helpers.coverage_map map JSON           # the map from a coverage.json
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The package's folders (pyproject maps moelink.<folder> to <folder>/); the generated gRPC stubs are not ours.
PACKAGE_DIRS = ("engine", "scheduler", "moe", "comm", "kernels", "planner", "benchmarks")
OMIT = ("engine/server/gen/",)
COVERAGE_DIR = ROOT / "build" / "coverage"

# torch.cuda's attributes that work on a CPU-only build (they answer "no CUDA"), and the exception a CPU-only run
# never raises but may name.
CUDA_SAFE = {"is_available", "device_count", "is_initialized", "_is_compiled"}
# Flags read by name: the Triton interpreter's (true only on CPU tensors; kernels' INTERPRET constexpr).
CPU_FLAG_NAMES = {"interp", "interpret", "INTERPRET", "interpreting"}
CPU_FLAG_CALLS = {"interpreting"}  # kernels/triton_common.interpreting(t): True exactly for CPU tensors
EXITS = (ast.Return, ast.Raise, ast.Continue, ast.Break)


@dataclass(frozen=True)
class Block:
    module: str      # path from the repository root: engine/rank/cuda_graph.py
    qualname: str    # Class.method, function.<locals>.inner as `function.inner`, `<module>` for module level
    kind: str        # branch | else | tail | call | except | def | function | expr
    start: int
    end: int
    why: str         # the predicate or API that makes it GPU-only, as written

    @property
    def lines(self) -> range:
        return range(self.start, self.end + 1)


def package_files(root: Path = ROOT) -> list[Path]:
    out = []
    for d in PACKAGE_DIRS:
        for p in sorted((root / d).rglob("*.py")):
            rel = p.relative_to(root).as_posix()
            if not rel.startswith(OMIT) and "__pycache__" not in rel:
                out.append(p)
    return out


def _src(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text if len(text) <= 80 else text[:77] + "..."


def _attr_chain(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def _const_str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


class _Flags:
    """Names and `self.` attributes that hold a CUDA test's answer (`cuda`) or its negation (`cpu`)."""

    def __init__(self, cuda: set[str] | None = None, cpu: set[str] | None = None):
        self.cuda, self.cpu = set(cuda or ()), set(cpu or ())

    def child(self) -> "_Flags":
        return _Flags(self.cuda, self.cpu)


def classify(test: ast.AST, flags: _Flags) -> tuple[bool, bool]:
    """(true_gpu, false_gpu): whether the test being true (false) means the code runs on CUDA."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        t, f = classify(test.operand, flags)
        return f, t
    if isinstance(test, ast.BoolOp):
        parts = [classify(v, flags) for v in test.values]
        # (an operand whose truth means CPU, beside one whose truth means CUDA: `dev.type == "cuda" and not
        # torch.cuda.is_available()` is the CPU machine asked for CUDA, not a CUDA branch)
        if isinstance(test.op, ast.And):
            return any(t for t, _ in parts) and not any(f for _, f in parts), all(f for _, f in parts)
        return all(t for t, _ in parts), any(f for _, f in parts) and not any(t for t, _ in parts)
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        left, right, op = test.left, test.comparators[0], test.ops[0]
        if isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)):
            word = _const_str(right) or _const_str(left)
            eq = isinstance(op, (ast.Eq, ast.Is))
            if word is not None and (word == "cuda" or word.startswith("cuda:") or word == "nccl"):
                return (True, False) if eq else (False, True)
            if word == "cpu":
                return (False, True) if eq else (True, False)
            if word == "1" and "TRITON_INTERPRET" in ast.unparse(test):
                return (False, True) if eq else (True, False)
        return False, False
    if isinstance(test, ast.Attribute) and test.attr == "is_cuda":
        return True, False
    if isinstance(test, ast.Subscript) and _const_str(test.slice) in CPU_FLAG_NAMES:  # flags["INTERPRET"]
        return False, True
    chain = _attr_chain(test)
    if chain is not None:
        name = chain[-1] if chain[0] != "self" or len(chain) == 2 else None
        key = ".".join(chain)
        if key in flags.cuda or (name is not None and name in flags.cuda):
            return True, False
        if key in flags.cpu or (name in CPU_FLAG_NAMES if name else False) or (name is not None and name in flags.cpu):
            return False, True
        return False, False
    if isinstance(test, ast.Call):
        fn = _attr_chain(test.func) or []
        if fn[-2:] == ["cuda", "is_available"]:
            return True, False
        if isinstance(test.func, ast.Attribute) and test.func.attr == "startswith" and test.args \
                and (_const_str(test.args[0]) or "").startswith("cuda"):  # device.startswith("cuda")
            return True, False
        if fn and fn[-1] in CPU_FLAG_CALLS:
            return False, True
        if "TRITON_INTERPRET" in ast.unparse(test):
            return False, True
    return False, False


def _gpu_api(node: ast.AST, flags: _Flags) -> str | None:
    """The first CUDA-only API use in `node` (conditional expressions' CUDA arms and CUDA-guarded parts skipped:
    those are the finder's own blocks), as written; None if there is none."""
    if isinstance(node, ast.IfExp):
        t, f = classify(node.test, flags)
        for arm, gpu in ((node.body, t), (node.orelse, f)):
            if not gpu:
                hit = _gpu_api(arm, flags)
                if hit:
                    return hit
        return _gpu_api(node.test, flags)
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):  # `cuda and torch.cuda.x()`: guarded
        for i, v in enumerate(node.values):
            hit = _gpu_api(v, flags)
            if hit:
                guarded = any(classify(u, flags)[0] for u in node.values[:i])
                if not guarded:
                    return hit
        return None
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
        return None  # a definition runs nothing (its body is scanned as its own scope)
    if isinstance(node, ast.AnnAssign):  # an annotation names a type, runs nothing
        return _gpu_api(node.value, flags) if node.value is not None else None
    chain = _attr_chain(node) if isinstance(node, ast.Attribute) else None
    if chain and len(chain) >= 3 and chain[-3:-1] == ["torch", "cuda"] or (
            chain and len(chain) >= 3 and chain[0] == "torch" and chain[1] == "cuda"):
        if chain[2] not in CUDA_SAFE and chain[2] != "OutOfMemoryError":
            return ".".join(chain)
        return None
    if isinstance(node, ast.Attribute) and node.attr == "cuda_stream":
        return _src(node)
    if isinstance(node, ast.Call):
        fn = node.func
        if isinstance(fn, ast.Attribute) and fn.attr in ("pin_memory", "cuda") and not node.args:
            return _src(node)
        if isinstance(fn, ast.Attribute) and fn.attr == "to" and node.args and (_const_str(node.args[0]) or "").startswith("cuda"):
            return _src(node)
        for kw in node.keywords:
            if kw.arg == "pin_memory" and isinstance(kw.value, ast.Constant) and kw.value.value is True:
                return _src(node)
            if kw.arg == "device" and (_const_str(kw.value) or "").startswith("cuda"):
                return _src(node)
    for child in ast.iter_child_nodes(node):
        hit = _gpu_api(child, flags)
        if hit:
            return hit
    return None


def _cuda_arms(node: ast.AST, flags: _Flags):
    """The CUDA arms of the conditional expressions in `node`: (arm, test)."""
    for sub in ast.walk(node):
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(sub, ast.IfExp):
            t, f = classify(sub.test, flags)
            for arm, gpu in ((sub.body, t), (sub.orelse, f)):
                if gpu:
                    yield arm, sub.test


def _headers(stmt: ast.stmt) -> list[ast.AST]:
    """The expressions a compound statement evaluates itself (not its bodies)."""
    if isinstance(stmt, (ast.If, ast.While)):
        return [stmt.test]
    if isinstance(stmt, (ast.For, ast.AsyncFor)):
        return [stmt.iter]
    if isinstance(stmt, (ast.With, ast.AsyncWith)):
        return [i.context_expr for i in stmt.items]
    if isinstance(stmt, ast.Try) or (hasattr(ast, "TryStar") and isinstance(stmt, ast.TryStar)):
        return []
    if isinstance(stmt, ast.Match):
        return [stmt.subject]
    return []


def _end(stmts: list[ast.stmt]) -> int:
    return max(s.end_lineno or s.lineno for s in stmts)


def _is_nccl_name(name: str) -> bool:
    return "nccl" in name.lower()


def _collect_flags(body: list[ast.stmt], flags: _Flags, self_attrs: bool) -> None:
    """Names (and self. attributes) assigned a CUDA test in `body` (not descending into nested definitions)."""
    todo = list(body)
    while todo:
        st = todo.pop()
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(st, (ast.Assign, ast.AnnAssign)) and st.value is not None:
            targets = st.targets if isinstance(st, ast.Assign) else [st.target]
            for target in targets:
                pairs = []
                if isinstance(target, ast.Tuple) and isinstance(st.value, ast.Tuple) and len(target.elts) == len(st.value.elts):
                    pairs = list(zip(target.elts, st.value.elts))
                else:
                    pairs = [(target, st.value)]
                for tgt, val in pairs:
                    chain = _attr_chain(tgt)
                    if chain is None or (chain[0] == "self") != self_attrs and len(chain) > 1:
                        continue
                    t, f = classify(val, flags)
                    key = ".".join(chain)
                    if t:
                        flags.cuda.add(key)
                    elif f:
                        flags.cpu.add(key)
        for field in ("body", "orelse", "finalbody", "handlers"):
            todo.extend(x for x in getattr(st, field, []) or [] if isinstance(x, ast.stmt))
        for h in getattr(st, "handlers", []) or []:
            todo.extend(h.body)


class _Finder:
    def __init__(self, module: str):
        self.module = module
        self.blocks: list[Block] = []

    def add(self, qual: str, kind: str, start: int, end: int, why: str) -> None:
        self.blocks.append(Block(self.module, qual or "<module>", kind, start, end, why))

    # -- scopes --------------------------------------------------------------------------------------------------
    def scope(self, body: list[ast.stmt], qual: str, flags: _Flags) -> None:
        self.stmts(body, qual, flags)

    def definition(self, node, qual: str, flags: _Flags) -> None:
        name = f"{qual}.{node.name}" if qual else node.name
        if _is_nccl_name(node.name):
            # The bodies only: a `def` / `class` line and a class's method definitions run at import.
            bodies = [node] if not isinstance(node, ast.ClassDef) else \
                [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for fn in bodies:
                body = _without_docstring(fn.body)
                if body:
                    self.add(name, "def", body[0].lineno, _end(body), f"NCCL-only: {node.name}")
            return
        if isinstance(node, ast.ClassDef):
            inner = flags.child()
            for item in node.body:  # self. attributes set in any method count in every method
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    _collect_flags(item.body, inner, self_attrs=True)
            self.stmts(node.body, name, inner)
            return
        inner = flags.child()
        _collect_flags(node.body, inner, self_attrs=False)
        before = len(self.blocks)
        body = _without_docstring(node.body)
        self.stmts(node.body, name, inner)
        mine = [b for b in self.blocks[before:] if b.qualname == name and b.kind != "expr"]
        if body and mine and _covers(mine, body):
            del self.blocks[before:]
            whys = "; ".join(dict.fromkeys(b.why for b in mine))
            self.add(name, "function", body[0].lineno, node.end_lineno or node.lineno, whys)

    # -- statements ----------------------------------------------------------------------------------------------
    def region(self, stmts: list[ast.stmt], qual: str, kind: str, why: str) -> None:
        if stmts:
            self.add(qual, kind, stmts[0].lineno, _end(stmts), why)

    def stmts(self, stmts: list[ast.stmt], qual: str, flags: _Flags) -> None:
        for i, st in enumerate(stmts):
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.definition(st, qual, flags)
                continue
            for arm, test in _cuda_arms(_shallow(st), flags):
                self.add(qual, "expr", arm.lineno, arm.end_lineno or arm.lineno, f"CUDA arm of `{_src(test)}`")
            head = _headers(st)
            hit = next((h for h in (_gpu_api(x, flags) for x in head) if h), None) if head else None
            if hit is None and not head and not isinstance(st, (ast.Try,)) and not _compound(st):
                hit = _gpu_api(st, flags)
            if hit is not None:
                self.add(qual, "call", st.lineno, st.end_lineno or st.lineno, f"uses {hit}")
                continue
            if isinstance(st, (ast.If, ast.While)):
                t, f = classify(st.test, flags)
                why = _src(st.test)
                if t:
                    self.region(st.body, qual, "branch", f"if {why}")
                else:
                    self.stmts(st.body, qual, flags)
                if f and st.orelse:
                    self.region(st.orelse, qual, "else", f"else of `{why}`")
                elif st.orelse:
                    self.stmts(st.orelse, qual, flags)
                if f and not st.orelse and isinstance(st, ast.If) and st.body and isinstance(st.body[-1], EXITS) \
                        and i + 1 < len(stmts):
                    self.region(stmts[i + 1:], qual, "tail", f"after `if {why}` exits")
                    return
                continue
            if isinstance(st, ast.Try) or (hasattr(ast, "TryStar") and isinstance(st, ast.TryStar)):
                self.stmts(st.body, qual, flags)
                for h in st.handlers:
                    if h.type is not None and "cuda" in ast.unparse(h.type):
                        self.region(h.body, qual, "except", f"except {_src(h.type)}")
                    else:
                        self.stmts(h.body, qual, flags)
                self.stmts(st.orelse, qual, flags)
                self.stmts(st.finalbody, qual, flags)
                continue
            if isinstance(st, ast.Match):
                for case in st.cases:
                    self.stmts(case.body, qual, flags)
                continue
            for field in ("body", "orelse"):
                self.stmts(getattr(st, field, []) or [], qual, flags)


def _without_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    if body and isinstance(body[0], ast.Expr) and _const_str(body[0].value) is not None:
        return body[1:]
    return body


def _compound(st: ast.stmt) -> bool:
    return any(isinstance(getattr(st, f, None), list) and getattr(st, f) and isinstance(getattr(st, f)[0], ast.stmt)
               for f in ("body", "orelse", "handlers", "finalbody", "cases"))


def _shallow(st: ast.stmt) -> ast.AST:
    """A statement without its nested statements (for compound statements: their header expressions only)."""
    if _compound(st):
        return ast.Module(body=[ast.Expr(value=h) for h in _headers(st)], type_ignores=[])
    return st


def _covers(blocks: list[Block], body: list[ast.stmt]) -> bool:
    lines = set()
    for b in blocks:
        lines.update(b.lines)
    return all(st.lineno in lines for st in body)


def find_blocks_in_source(source: str, module: str) -> list[Block]:
    tree = ast.parse(source)
    finder = _Finder(module)
    flags = _Flags()
    _collect_flags(tree.body, flags, self_attrs=False)
    finder.scope(tree.body, "", flags)
    return sorted(finder.blocks, key=lambda b: (b.start, b.end))


def find_blocks(root: Path = ROOT) -> dict[str, list[Block]]:
    """{module path: its GPU-only blocks}, for every module of the package that has any."""
    out = {}
    for path in package_files(root):
        rel = path.relative_to(root).as_posix()
        blocks = find_blocks_in_source(path.read_text(), rel)
        if blocks:
            out[rel] = blocks
    return out


def qualnames(blocks: list[Block]) -> list[str]:
    return list(dict.fromkeys(b.qualname for b in blocks))


# -- make coverage's plumbing -----------------------------------------------------------------------------------------
PTH_NAME = "moelink_coverage_ray.pth"


def pth_line(root: Path = ROOT) -> str:
    """The .pth line that runs tests/helpers/coverage_ray.py at the start of every Python coverage measures (a
    .pth line that starts with `import` is executed by site.py; after coverage's own a1_coverage.pth)."""
    path = str(root / "tests" / "helpers" / "coverage_ray.py")
    return (f'import os; p = {path!r}; os.environ.get("COVERAGE_PROCESS_CONFIG") and os.path.exists(p) and '
            f'exec(compile(open(p).read(), p, "exec"), {{"__name__": "moelink_coverage_ray", "__file__": p}})\n')


def install_pth() -> Path:
    target = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    if not target.exists() or target.read_text() != pth_line():
        target.write_text(pth_line())
    return target


def _settle(directory: Path, quiet_s: float = 5.0, limit_s: float = 60.0) -> None:
    """Wait until no data file in `directory` changed for `quiet_s` (Ray workers save every 2 s until they are
    gone; a Ray that outlives pytest by a few seconds still hands its last lines in), at most `limit_s`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        newest = max((p.stat().st_mtime for p in directory.glob(".coverage.*")), default=0.0)
        if time.time() - newest >= quiet_s:
            return
        time.sleep(1.0)


def write_reports(directory: Path = COVERAGE_DIR) -> dict:
    """Combine the run's data files, then report.txt (coverage report --show-missing, most missed first),
    coverage.json, map.md and map.json in `directory`; returns the map's summary."""
    import coverage

    _settle(directory)
    cov = coverage.Coverage(config_file=str(ROOT / "pyproject.toml"),
                            data_file=str(directory / ".coverage"))
    cov.load()  # (what an earlier combine of this run left, if any)
    cov.combine(strict=False)  # (a data file cut short by a kill is warned about and skipped)
    cov.save()
    with open(directory / "report.txt", "w") as f:
        cov.report(file=f, show_missing=True, sort="-miss", ignore_errors=True)
    cov.json_report(outfile=str(directory / "coverage.json"), ignore_errors=True)
    data = json.loads((directory / "coverage.json").read_text())
    result = coverage_map(data, find_blocks())
    (directory / "map.json").write_text(json.dumps(result, indent=1))
    (directory / "map.md").write_text(map_markdown(result))
    return result["summary"]


# -- the map ------------------------------------------------------------------------------------------------------------
def _ranges(lines: list[int], statements: list[int]) -> list[tuple[int, int]]:
    """Missed statement lines as ranges, a range running on over lines that are not statements."""
    missed, out = set(lines), []
    for line in sorted(statements):
        if line in missed:
            if out and out[-1][2]:
                out[-1][1] = line
            else:
                out.append([line, line, True])
        elif out:
            out[-1][2] = False
    return [(a, b) for a, b, _ in out]


def _innermost(blocks: list[Block], line: int) -> Block | None:
    inside = [b for b in blocks if b.kind != "expr" and b.start <= line <= b.end]
    return min(inside, key=lambda b: b.end - b.start) if inside else None


def coverage_map(data: dict, blocks: dict[str, list[Block]]) -> dict:
    """coverage.json's `data` and the finder's blocks -> {"summary": ..., "modules": {path: ...}} (see map_markdown)."""
    files = {}
    for name, entry in data["files"].items():
        rel = Path(name).resolve().relative_to(ROOT).as_posix() if Path(name).is_absolute() else Path(name).as_posix()
        files[rel] = entry
    modules, total_missed, gpu_missed = {}, 0, 0
    reached, unreached = 0, 0
    for rel in sorted(set(files) | set(blocks)):
        entry = files.get(rel, {"executed_lines": [], "missing_lines": [], "summary": {}})
        executed, missing = set(entry["executed_lines"]), list(entry["missing_lines"])
        statements = sorted(executed | set(missing))
        mine = blocks.get(rel, [])
        segments = []  # [start, end, qualname or None]
        for a, b in _ranges(missing, statements):
            for line in (x for x in statements if a <= x <= b and x in set(missing)):
                owner = _innermost(mine, line)
                label = f"{owner.qualname} ({owner.kind})" if owner else None
                if segments and segments[-1][2] == label and segments[-1][3] == (a, b):
                    segments[-1][1] = line
                else:
                    segments.append([line, line, label, (a, b)])
        in_gpu = sum(1 for line in missing if _innermost(mine, line) is not None)
        block_rows = []
        for blk in mine:
            stmts_in = [x for x in statements if blk.start <= x <= blk.end]
            ran = any(x in executed for x in stmts_in)
            if blk.kind == "expr":
                state = "line run (which arm, unknown)" if ran else "line never run"
            else:
                state = "run on CPU" if ran else "never run on CPU"
                reached, unreached = reached + ran, unreached + (not ran)
            block_rows.append({**asdict(blk), "state": state})
        total_missed += len(missing)
        gpu_missed += in_gpu
        if missing or mine:
            modules[rel] = {
                "statements": len(statements), "missed": len(missing), "missed_in_gpu_blocks": in_gpu,
                "missed_ranges": [{"start": s, "end": e, "gpu_block": lab} for s, e, lab, _ in segments],
                "gpu_blocks": block_rows,
            }
    totals = data.get("totals", {})
    summary = {
        "statements": totals.get("num_statements"), "covered": totals.get("covered_lines"),
        "percent": round(totals.get("percent_covered", 0.0), 1), "missed": total_missed,
        "missed_in_gpu_blocks": gpu_missed, "gpu_blocks_run_on_cpu": reached, "gpu_blocks_never_run_on_cpu": unreached,
        "modules_with_gpu_blocks": sum(1 for m in modules.values() if m["gpu_blocks"]),
        "most_missed": [(rel, m["missed"]) for rel, m in sorted(modules.items(), key=lambda kv: -kv[1]["missed"])[:15]],
    }
    return {"summary": summary, "modules": modules}


def headline(summary: dict) -> str:
    return (f"{summary['covered']:,} of {summary['statements']:,} statements run ({summary['percent']} %); "
            f"{summary['missed']:,} never run, {summary['missed_in_gpu_blocks']:,} of them inside GPU-only blocks; "
            f"GPU-only blocks (expression arms aside): {summary['gpu_blocks_run_on_cpu']} reached on CPU, "
            f"{summary['gpu_blocks_never_run_on_cpu']} never run on CPU, in {summary['modules_with_gpu_blocks']} modules")


def map_markdown(result: dict) -> str:
    s = result["summary"]
    out = ["# Lines the CPU suite never runs (`make coverage`)", "",
           "Made by `python -m tests.helpers.coverage_map` from coverage.json; GPU-only blocks as the static finder "
           "names them (docs/gpu-session-steps.md#gpu-only-code-where-it-runs says which GPU step runs each).", "",
           headline(s) + ".", "", "## Most missed", "", "| module | missed | in GPU-only blocks |", "|---|---|---|"]
    for rel, n in s["most_missed"]:
        out.append(f"| `{rel}` | {n} | {result['modules'][rel]['missed_in_gpu_blocks']} |")
    out += ["", "## Per module", ""]
    for rel, m in result["modules"].items():
        out.append(f"### `{rel}`: {m['missed']} of {m['statements']} statements never run"
                   + (f", {m['missed_in_gpu_blocks']} in GPU-only blocks" if m["gpu_blocks"] else ""))
        out.append("")
        if m["missed_ranges"]:
            parts = [(f"{r['start']}" if r["start"] == r["end"] else f"{r['start']}-{r['end']}")
                     + (f" [GPU: {r['gpu_block']}]" if r["gpu_block"] else "") for r in m["missed_ranges"]]
            out.append("Missed: " + ", ".join(parts))
            out.append("")
        for b in m["gpu_blocks"]:
            out.append(f"- GPU-only `{b['qualname']}` {b['start']}-{b['end']} ({b['kind']}: {b['why']}): {b['state']}")
        if m["gpu_blocks"]:
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.helpers.coverage_map", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("blocks", help="the static finder's GPU-only blocks, per module")
    b.add_argument("--json", action="store_true")
    sub.add_parser("pth", help="write the Ray workers' coverage hook (.pth) into this Python's site-packages")
    r = sub.add_parser("report", help="combine, then report.txt, coverage.json, map.md, map.json")
    r.add_argument("dir", nargs="?", default=str(COVERAGE_DIR))
    m = sub.add_parser("map", help="the map (markdown) from a coverage.json")
    m.add_argument("json_file")
    args = ap.parse_args(argv)
    if args.cmd == "blocks":
        found = find_blocks()
        if args.json:
            print(json.dumps({k: [asdict(x) for x in v] for k, v in found.items()}, indent=1))
        else:
            for rel, blocks in found.items():
                print(rel)
                for x in blocks:
                    print(f"  {x.start}-{x.end}  {x.qualname}  [{x.kind}] {x.why}")
            print(f"{sum(map(len, found.values()))} GPU-only blocks, {sum(len(qualnames(v)) for v in found.values())} "
                  f"qualified names, in {len(found)} modules")
    elif args.cmd == "pth":
        print(f"coverage hook for Ray workers: {install_pth()}")
    elif args.cmd == "report":
        directory = Path(args.dir)
        summary = write_reports(directory)
        print(f"coverage: {headline(summary)}")
        print("most missed: " + ", ".join(f"{rel} {n}" for rel, n in summary["most_missed"][:10]))
        print(f"reports: {directory}/report.txt, coverage.json, map.md, map.json")
    else:
        data = json.loads(Path(args.json_file).read_text())
        print(map_markdown(coverage_map(data, find_blocks())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
