"""docs/models.md's "Every MoE architecture vLLM and SGLang register" section is the registry's own word (issue 96,
item 4): equal to engine/tools/arch_table.py's rendering, every peer name served or saying why, and the hand-written
"Supported architectures" table naming every architecture the registry serves."""
from __future__ import annotations

from pathlib import Path

from moelink.engine.config.architectures import REGISTRY, TEXT_MODEL_OF
from moelink.engine.config.awaited import AWAITED
from moelink.engine.config.peer_architectures import ALSO_NAMED, PEER_ARCHITECTURES
from moelink.engine.tools import arch_table

PAGE = Path(__file__).resolve().parents[2] / arch_table.DOC_PAGE


def _page() -> str:
    return PAGE.read_text()


def _rows(table: str) -> dict[str, str]:
    """architecture -> its moelink cell, from the generated table's rows."""
    rows = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells[2]
    return rows


def test_docs_section_is_the_generators_output():
    shown = arch_table.doc_table(_page())
    assert shown is not None, f"{arch_table.DOC_PAGE} lost its {arch_table.BEGIN_MARK} section"
    assert shown == arch_table.arch_table(), (
        f"{arch_table.DOC_PAGE}'s architecture table is stale: run `python -m moelink.engine.tools.arch_table --doc`")


def test_peer_names_are_unique_and_counted_as_the_sources_say():
    names = [p.name for p in (*PEER_ARCHITECTURES, *ALSO_NAMED)]
    assert len(names) == len(set(names))
    assert all(set(p.engines) <= {"vllm", "sglang"} and p.engines for p in PEER_ARCHITECTURES)
    assert all(p.engines == () for p in ALSO_NAMED)
    # vLLM 0.33.0's three tables and SGLang 0.5.23's EntryClass names read as engine/config/peer_architectures.py
    # says: 107 and 16 more (issue 96 counted 106 + 13; the difference is in that module's report, not hidden here).
    assert sum("vllm" in p.engines for p in PEER_ARCHITECTURES) == 107
    assert sum(p.engines == ("sglang",) for p in PEER_ARCHITECTURES) == 16


def test_every_peer_name_is_served_or_says_why():
    served = arch_table.served_names()
    awaited = {n for a in AWAITED for n in a.architectures}
    for p in (*PEER_ARCHITECTURES, *ALSO_NAMED):
        if p.name in served:
            assert not p.reason, (f"{p.name} is served now: delete its reason in "
                                  f"engine/config/peer_architectures.py and rerun the generator")
        elif p.name in awaited:
            assert not p.reason, f"{p.name}: engine/config/awaited.py says why; no second reason"
        else:
            assert p.reason, f"{p.name} is not served: engine/config/peer_architectures.py must say why"


def test_table_has_one_row_per_name_and_marks_every_served_one_served():
    rows = _rows(arch_table.arch_table())
    assert list(rows) == [p.name for p in (*PEER_ARCHITECTURES, *ALSO_NAMED)]
    served = arch_table.served_names()
    for name, cell in rows.items():
        assert cell.startswith("served") == (name in served), (name, cell)
        assert cell.startswith(("served", "awaited: ", "not served: ")), (name, cell)
    peers = {p.name for p in PEER_ARCHITECTURES}
    n_served = len(peers & set(served))
    assert f"moelink serves {n_served} of the {len(PEER_ARCHITECTURES)} " in arch_table.arch_table()
    # What the registry serves that neither peer registers is named under the table, none left out.
    tail = arch_table.arch_table().rsplit("\n", 1)[1]
    assert all(f"`{n}`" in tail for n in served if n not in peers)


def test_formats_are_the_tiny_arches_of_served_names():
    rows = arch_table.arch_table().splitlines()
    for line in rows:
        if line.startswith("| `Qwen3MoeForCausalLM` |"):
            assert line.endswith("| `--arch qwen3_moe`: float fp8 int4 gptq awq nvfp4 |")
        if line.startswith("| `GptOssForCausalLM` |"):
            assert "MXFP4 experts as published" in line
        if line.startswith("| `DeepseekForCausalLM` |"):
            assert line.endswith("|  |")


def test_hand_written_table_names_every_served_architecture():
    page = _page()
    hand = page[page.index("## Supported architectures"):page.index(arch_table.BEGIN_MARK)]
    missing = [n for n in (*(n for n, a in REGISTRY.items() if a.runnable), *TEXT_MODEL_OF) if f"`{n}`" not in hand]
    assert not missing, f"docs/models.md's Supported architectures table does not name {missing}"
