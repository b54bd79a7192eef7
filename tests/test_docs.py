"""README, ARCHITECTURE.md, deploy/README.md and the pages of docs/ as a newcomer meets them (issues 14 and 40):
the blocks marked runnable run as pasted from the repository root (Python against the committed built-in model,
shell with .venv/bin first on PATH), every relative link resolves to a file or folder inside the repository,
and every `page.md#anchor` to a heading of that page."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import zygote

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "ARCHITECTURE.md", "deploy/README.md",
        *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))]  # docs/architecture/ too
MARKER = "<!-- runnable -->"
RUNNABLE = re.compile(r"<!-- runnable -->\n```(python|sh)\n(.*?)\n```", re.DOTALL)
# How many blocks each page marks runnable, by language: a marker that no longer matches (a block renamed
# ```bash, a page split) shows here rather than as a block that silently stopped being run.
RUNNABLE_BLOCKS = {
    "README.md": {"python": 1},
    "docs/serving.md": {"python": 2, "sh": 1},  # the LLM API, AsyncEngine streaming
    "docs/structured-output.md": {"python": 1},
    "docs/models.md": {"sh": 1},
    "docs/quantization.md": {"sh": 1},
    "docs/speculative-decoding.md": {"sh": 1},
    "docs/disaggregation.md": {"sh": 1},
    "docs/security.md": {"sh": 1},
    "docs/metrics.md": {"sh": 1},
    "docs/vllm-compat.md": {"sh": 1},  # --port's help says it is gRPC
    "docs/expert-parallelism.md": {"sh": 1},
    "docs/tensor-parallelism.md": {"sh": 1},
    "docs/planner.md": {"sh": 1},
    "docs/kernels.md": {"sh": 1},
    "docs/benchmarks.md": {"sh": 2},
    "docs/testing.md": {"sh": 1},
    "docs/gpu-session-steps.md": {"sh": 1},
    "docs/dependencies.md": {"sh": 1},
}
SH_TIMEOUT_S = 120  # each block is a --help, a cluster-model run or a small offline command: 0.1-4 s
# [text](target) and ![alt](target); the target ends at whitespace or ")" (a title may follow).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def runnable_blocks(doc: str) -> list[tuple[str, str]]:
    """(language, code) of each block the page marks runnable, in page order."""
    return RUNNABLE.findall((ROOT / doc).read_text())


def _all_blocks(language: str) -> list[tuple[str, int]]:
    return [(doc, i) for doc in DOCS for i, (lang, _) in enumerate(runnable_blocks(doc)) if lang == language]


@pytest.mark.parametrize("doc", DOCS)
def test_each_runnable_marker_opens_a_python_or_sh_block(doc):
    markers = re.findall(rf"^{re.escape(MARKER)}$", (ROOT / doc).read_text(), flags=re.M)  # prose may quote one
    assert len(markers) == len(runnable_blocks(doc)), \
        f"{doc}: a {MARKER} marker is not followed by a ```python or ```sh block"


def test_pages_mark_their_runnable_blocks():
    for doc, want in RUNNABLE_BLOCKS.items():
        langs = [lang for lang, _ in runnable_blocks(doc)]
        got = {lang: langs.count(lang) for lang in set(langs)}
        assert got == want, f"{doc}: runnable blocks {got}, expected {want}"
    snippets = [code for lang, code in runnable_blocks("docs/serving.md") if lang == "python"]
    assert any("asyncio.run(main())" in s for s in snippets), "the AsyncEngine snippet must run as pasted"


@pytest.mark.slow  # each builds and runs an engine: 4 to 18 s on a loaded 2-core machine
@pytest.mark.parametrize("doc,index", _all_blocks("python"), ids=lambda v: str(v))
def test_python_block_runs_as_pasted(doc, index, monkeypatch, capsys):
    """Each from the repository root (where the committed `builtin-model/` is), as the pages say, in a fresh
    namespace, as a script."""
    code = runnable_blocks(doc)[index][1]
    monkeypatch.chdir(ROOT)
    exec(compile(code, f"{doc} runnable block {index + 1}", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.strip(), "the snippet printed nothing"


def _venv_bin() -> Path:
    venv = ROOT / ".venv" / "bin"
    return venv if (venv / "python").exists() else Path(sys.executable).parent


@pytest.fixture(scope="module")
def sh_env(tmp_path_factory):
    """The blocks' environment: .venv/bin first on PATH, offline. Before it, `python` and `moelink` that start the
    same interpreter on the same code (`python ARGS` as given; `moelink ARGS` as .venv/bin/moelink's entry point
    runs, its argv[0] that script) forked from a zygote with torch and transformers imported, started with this
    environment (tests/helpers/zygote.py; zygote_shim.py execs the real interpreter for anything it does not
    fork): most blocks are `moelink ...` or `python -m moelink...` starts, ~1.8 s of CPU each exec'd."""
    env = {**os.environ, "PATH": f"{_venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    z = zygote.start_for(env)
    if z is None:
        yield env
        return
    shims = tmp_path_factory.mktemp("sh_bin")
    helpers = ROOT / "tests" / "helpers"
    entry = (f"import sys; sys.argv[0] = {str(_venv_bin() / 'moelink')!r}; "
             "from moelink.engine.api.cli import main; sys.exit(main())")
    (shims / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(str(helpers / "zygote_python"))} "$@"\n')
    (shims / "moelink").write_text(f'#!/bin/sh\nexec {shlex.quote(str(helpers / "zygote_python"))} -c '
                                   f'{shlex.quote(entry)} "$@"\n')
    for f in shims.iterdir():
        f.chmod(0o755)
    try:
        where = {k: v for k, v in z.shim_env().items() if k != "PYTHON"}  # the shims find the zygote; no $PYTHON set
        yield {**env, **where, "PATH": f"{shims}{os.pathsep}{env['PATH']}"}
    finally:
        z.close()


_SH_RUNS: dict[str, subprocess.CompletedProcess] = {}


def _commands_of(code: str) -> str:
    """A block's commands without blank lines and trailing comments (on lines that quote nothing): two pages' blocks
    that differ only in those run the same."""
    return "\n".join(re.sub(r"\s+#[^'\"]*$", "", line).rstrip() for line in code.splitlines() if line.strip())


@pytest.mark.parametrize("doc,index", _all_blocks("sh"), ids=lambda v: str(v))
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_sh_block_runs_as_pasted(doc, index, sh_env):
    """With bash from the repository root, .venv/bin first on PATH (what `source .venv/bin/activate` gives),
    stopping at the first failing command (pipefail too), offline (`sh_env`)."""
    code = runnable_blocks(doc)[index][1]
    env = sh_env
    # Two pages may paste the same commands (gpu-sessions.md and gpu-session-steps.md: `gpu_session.sh plan`, ~3 s):
    # the second reads the first one's run (sh_env is module-scoped, so one worker runs every block).
    key = _commands_of(code)
    proc = _SH_RUNS.get(key)
    if proc is None:
        proc = _SH_RUNS[key] = subprocess.run([shutil.which("bash") or "bash", "-euo", "pipefail", "-c", code],
                                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=SH_TIMEOUT_S)
    assert proc.returncode == 0, f"{doc} runnable block {index + 1} exited {proc.returncode}:\n{code}\n" \
                                 f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"


def _links(doc: str) -> list[str]:
    text = (ROOT / doc).read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # code blocks hold no links
    return LINK.findall(text)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation (backticks, colons, parentheses) dropped,
    spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve_to_files_in_the_repository(doc):
    links = _links(doc)
    bad = []
    for target in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        file_part, _, anchor = target.partition("#")
        path = (ROOT / doc).parent / file_part if file_part else ROOT / doc
        resolved = path.resolve()
        if ROOT not in resolved.parents or not (resolved.is_file() or resolved.is_dir()):
            bad.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            bad.append(f"{target} (no such heading)")
    assert not bad, f"{doc} links outside the repository or to missing files or headings: {bad}"
    if doc == "README.md":
        assert "ARCHITECTURE.md" in links, "README must link its architecture page"
        assert "docs/README.md" in links, "README must link the docs index"


def test_the_docs_index_lists_every_page():
    listed = set(_links("docs/README.md"))
    missing = [name for name in (p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
               if name != "README.md" and name not in listed]
    assert not missing, f"docs/README.md does not list {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_docs_name_no_path_outside_the_repository(doc):
    text = (ROOT / doc).read_text()
    for outside in ("../shared", "/work/", "DESIGN.md"):
        assert outside not in text, f"{doc} refers to {outside!r}, which is not in the repository"


def test_no_tracked_file_cites_a_design_document_outside_the_repository():
    """Code comments cite ARCHITECTURE.md's sections (Design rules N, Layers, ...), not a DESIGN.md that the
    repository does not have."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    citing = [name for name in files.decode().split("\0")
              if name and name != "tests/test_docs.py" and (ROOT / name).is_file()
              and b"DESIGN.md" in (ROOT / name).read_bytes()]
    assert not citing, f"these files cite DESIGN.md, which is not in the repository: {citing}"


def test_code_citations_of_architecture_name_its_rules_and_sections():
    """Comments cite "ARCHITECTURE.md: Design rules N" (or "ARCHITECTURE.md rule N") and "ARCHITECTURE.md: Section":
    each number is one of the page's design rules and each section one of its headings, so moving a long text to
    docs/architecture/ (issue 56 item 6) cannot leave a citation pointing at nothing."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    page = (ROOT / "ARCHITECTURE.md").read_text()
    rules = set(re.findall(r"^(\d+)\. ", _section("ARCHITECTURE.md", "Design rules"), flags=re.M))
    headings = {h.strip() for h in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", page, flags=re.DOTALL),
                                              flags=re.M)}
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    bad = []
    for name in files.decode().split("\0"):
        if not name.endswith((".py", ".md", ".toml", ".json")) or name == "tests/test_docs.py" \
                or not (ROOT / name).is_file():
            continue
        text = re.sub(r"\s+", " ", (ROOT / name).read_text(errors="replace"))
        for cited in re.findall(r"ARCHITECTURE\.md:? (?:Design rules|rule) (\d+(?: and \d+)*)", text):
            bad += [f"{name}: rule {n}" for n in re.findall(r"\d+", cited) if n not in rules]
        for section in re.findall(r"ARCHITECTURE\.md[:,] ([A-Z][^.;:()]*?)[.;:)]", text):
            if not section.startswith("Design rules") and section not in headings:
                bad.append(f"{name}: section {section!r}")
    assert not bad, f"citations of ARCHITECTURE.md that name no rule or heading of it: {bad}"


def test_link_pattern_reads_the_forms_the_docs_use():
    text = 'see [a](b.md), ![img](c/d.png "t"), [x](../README.md#bad-input) and [y](#z) but not [z] (w)'
    assert LINK.findall(text) == ["b.md", "c/d.png", "../README.md#bad-input", "#z"]


def test_slug_is_githubs_anchor():
    assert _slug("The overlapped step loop (`async_scheduling`, on by default)") == \
        "the-overlapped-step-loop-async_scheduling-on-by-default"
    assert _slug("When to disaggregate (the cluster model's numbers)") == \
        "when-to-disaggregate-the-cluster-models-numbers"


def _section(doc: str, title: str) -> str:
    text = (ROOT / doc).read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_the_command_line_section_names_the_grpc_client():
    """The shell's way to try a gRPC server (engine/server/client.py), as `make serve` prints it (issue 27)."""
    client = "python -m moelink.engine.server.client --target 127.0.0.1:50051"
    assert client in _section("docs/serving.md", "Command line")
    assert client in (ROOT / "README.md").read_text()


def test_benchmark_clients_install_into_the_project_venv():
    """aiperf and guidellm resolve beside moelink's pins (issue 27): no separate venvs to tell people to make."""
    section = _section("docs/benchmarks.md", "Benchmark clients, offline (moelink bench-serve, aiperf, guidellm)")
    assert ".venv/bin/pip install aiperf guidellm" in section
    assert "venv of its own" not in section and "aiperf-venv" not in section and "guidellm-venv" not in section


# -- every shell block accounted for (issue 54 item 7) -----------------------------------------------------------------
# A ```sh / ```bash / ```console block is run (marked runnable, above), or each of its `moelink ...`,
# `python -m moelink.X ...` and `make ...` lines is checked without running it (tests/helpers/doc_commands.py: the
# real moelink parser, module X's argparse source, the Makefile), or it says why not: <!-- not-run: REASON -->
# before it (GPU, cluster, network, other tools). Its checkable lines are checked in every case.

def _shell_blocks(doc: str):
    from tests.helpers.doc_commands import shell_blocks

    return shell_blocks(doc)


@pytest.mark.parametrize("doc", DOCS)
def test_every_shell_block_is_run_checked_or_says_why_not(doc):
    from tests.helpers.doc_commands import NOT_RUN, commands, unchecked

    bad = []
    for block in _shell_blocks(doc):
        if block.marker == "runnable":
            continue
        if block.marker == "not-run":
            if len(block.reason) < 8:
                bad.append(f"{block.where}: its not-run marker gives no reason")
            continue
        for command in commands(block):
            if unchecked(command):
                bad.append(f"{block.where}, line {command.line}: `{command.text}` is neither run nor checkable: "
                           f"mark the block runnable (quick, CPU, offline) or put <!-- not-run: REASON --> before it")
                break  # one line names the block
    text = (ROOT / doc).read_text()
    markers = [ln for ln in text.splitlines() if NOT_RUN.match(ln.strip())]
    marked = [b for b in _shell_blocks(doc) if b.marker == "not-run"]
    if len(markers) != len(marked):
        bad.append(f"{doc}: {len(markers)} not-run markers, {len(marked)} of them before a ```sh/bash/console block")
    if bad:
        pytest.fail("\n".join(bad), pytrace=False)


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_parse(doc):
    """Each `moelink SUB ...` line parses with `moelink`'s own parser (placeholders as values of their flags'
    types, [optional] parts read every way), each `python -m moelink.X --flag` names a flag X defines, each
    `make TARGET VAR=` a Makefile target and variable, each `python -m pytest tests/...` an existing path."""
    from tests.helpers.doc_commands import check_command, commands

    bad = []
    for block in _shell_blocks(doc):
        if block.marker == "runnable":
            continue  # run as pasted, above
        for command in commands(block):
            err = check_command(command)
            if err:
                bad.append(f"{block.where}, line {command.line}: `{command.text}`: {err}")
    if bad:
        pytest.fail("documented commands that no longer parse:\n" + "\n".join(bad), pytrace=False)


@pytest.mark.parametrize("doc", DOCS)
def test_inline_make_commands_name_makefile_targets_and_variables(doc):
    """`make serve PORT=...` in prose as in blocks: the Makefile has the target and the variables."""
    from tests.helpers.doc_commands import check_make

    text = re.sub(r"```.*?```", "", (ROOT / doc).read_text(), flags=re.DOTALL)
    bad = []
    for span in re.findall(r"`(make [^`]+)`", text):
        try:
            argv = shlex.split(span)
        except ValueError as exc:
            bad.append(f"`{span}`: {exc}")
            continue
        err = check_make(argv)
        if err:
            bad.append(f"`{span}`: {err}")
    assert not bad, f"{doc}: {bad}"


def test_the_command_checks_catch_drift():
    """What the two tests above would report: a flag, a subcommand, a module flag, a make target or variable
    that is not there; a placeholder typed by its flag; an optional part read both ways; an unmarked block."""
    from tests.helpers.doc_commands import Block, check_command, commands, unchecked

    def check(code: str, lang: str = "bash"):
        block = Block("x.md", 1, 10, lang, code, None)
        return [(c.line, c.kind, check_command(c), unchecked(c)) for c in commands(block)]

    assert check("moelink serve MODEL --port PORT --http-port HTTP_PORT   # comment --nope") == \
        [(10, "moelink", None, False)]
    assert "unrecognized arguments: --kv-nixl-holds" in check("moelink serve MODEL --kv-nixl-holds 5")[0][2]
    assert "invalid int value: 'x'" in check("moelink serve MODEL --port x")[0][2]
    assert "invalid choice" in check("moelink serve MODEL --role pd")[0][2]
    assert check("moelink nosuch --x")[0][2] == "no subcommand 'nosuch'"
    # [--http-port 8000 | --no-http] read both ways; the second way alone would clash with --http-port
    assert check("moelink serve M [--http-port 8000 | --no-http] [--metrics-port N]")[0][2] is None
    assert "not allowed with" in check("moelink serve M --http-port 8000 [--metrics-port 1 | --no-http]")[0][2]
    # a continuation line, then a chain: the second command checked on its own, the first line's number
    assert check("moelink serve M \\\n  --port 1 &\nmoelink http-front --port 8000 --upstream-port $SMG_PORT") == \
        [(10, "moelink", None, False), (12, "moelink", None, False)]
    assert "--serve-args: moelink serve: error: unrecognized arguments: --nope" in \
        check("moelink bench-serve --model m --serve-args '--num-kv-blocks 8 --nope'")[0][2]
    assert check("python -m moelink.benchmarks.kv_transfer --transports tcp --nope")[0][2] == \
        "benchmarks/kv_transfer.py defines no --nope (add_argument)"
    assert check("python -m moelink.benchmarks.no_such_bench")[0][2] == \
        "no module moelink.benchmarks.no_such_bench in the repository"
    assert check("make serve PORT=1 HTTP_PORT=2 SERVE_ARGS='--max-model-len 64'")[0][2] is None
    assert check("make serve PROT=1")[0][2] == "the Makefile has no variable PROT"
    assert check("make servee")[0][2] == "the Makefile has no target servee"
    assert "SERVE_ARGS: moelink serve" in check("make serve SERVE_ARGS=--nope")[0][2]
    assert check(".venv/bin/python -m pytest -q tests/no_such_test.py")[0][1:3] == \
        ("pytest", "no such test path: tests/no_such_test.py")
    assert [u for *_, u in check("source .venv/bin/activate\ncurl -s http://x\nOUT=$OUT bash run.sh")] == \
        [False, True, True]
    assert check("$ moelink serve M --nope\nusage: moelink ...", lang="console")[0][2].endswith("--nope")
