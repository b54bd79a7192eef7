"""README and ARCHITECTURE.md as a newcomer meets them (issue 14): the Python snippets marked runnable run as
pasted against a tiny random model, and every relative link resolves to a file inside the repository."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "ARCHITECTURE.md", "deploy/README.md"]
RUNNABLE = re.compile(r"<!-- runnable -->\n```python\n(.*?)\n```", re.DOTALL)
# [text](target) and ![alt](target); the target ends at whitespace or ")" (a title may follow).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def runnable_snippets() -> list[str]:
    return RUNNABLE.findall((ROOT / "README.md").read_text())


def test_readme_marks_its_python_snippets_runnable():
    snippets = runnable_snippets()
    assert len(snippets) == 3, "README's runnable snippets: the LLM API, AsyncEngine streaming, structured output"
    assert any("asyncio.run(main())" in s for s in snippets), "the AsyncEngine snippet must run as pasted"


@pytest.mark.slow  # each builds and runs an engine: 4 to 18 s on a loaded 2-core machine
@pytest.mark.parametrize("index", range(3))
def test_readme_snippet_runs_as_pasted(index, monkeypatch, capsys):
    """Each from the repository root (where the committed `builtin-model/` is), as README says, in a fresh
    namespace, as a script."""
    code = runnable_snippets()[index]
    monkeypatch.chdir(ROOT)
    exec(compile(code, f"README.md runnable snippet {index + 1}", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.strip(), "the snippet printed nothing"


def _links(doc: str) -> list[str]:
    text = (ROOT / doc).read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # code blocks hold no links
    return LINK.findall(text)


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve_to_files_in_the_repository(doc):
    links = _links(doc)
    bad = []
    for target in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page
        path = (ROOT / doc).parent / target.split("#", 1)[0]
        resolved = path.resolve()
        if ROOT not in resolved.parents or not resolved.is_file():
            bad.append(target)
    assert not bad, f"{doc} links outside the repository or to missing files: {bad}"
    if doc == "README.md":
        assert "ARCHITECTURE.md" in links, "README must link its architecture page"


@pytest.mark.parametrize("doc", DOCS)
def test_docs_name_no_path_outside_the_repository(doc):
    text = (ROOT / doc).read_text()
    for outside in ("../shared", "/work/", "DESIGN.md"):
        assert outside not in text, f"{doc} refers to {outside!r}, which is not in the repository"


def test_link_pattern_reads_the_forms_the_docs_use():
    text = 'see [a](b.md), ![img](c/d.png "t"), [x](../README.md#bad-input) and [y](#z) but not [z] (w)'
    assert LINK.findall(text) == ["b.md", "c/d.png", "../README.md#bad-input", "#z"]


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    return text[start:text.find("\n## ", start + 1)]


def test_the_command_line_section_names_the_grpc_client():
    """The shell's way to try a gRPC server (engine/server/client.py), as `make serve` prints it (issue 27)."""
    assert "python -m moelink.engine.server.client --target 127.0.0.1:50051" in _readme_section("Command line")


def test_benchmark_clients_install_into_the_project_venv():
    """aiperf and guidellm resolve beside moelink's pins (issue 27): no separate venvs to tell people to make."""
    section = _readme_section("Benchmarks")
    assert ".venv/bin/pip install aiperf guidellm" in section
    assert "venv of its own" not in section and "aiperf-venv" not in section and "guidellm-venv" not in section
