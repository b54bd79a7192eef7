"""The import layering, computed from the code: no upward imports, no import cycles (the rule is ALLOWED below).

Every `import` and `from ... import` of every module counts, lazy ones inside functions included (a lazy
import is still a dependency: it only moves the failure to run time); the graph is built by
tests/helpers/import_graph.py. Each folder's `__init__.py` docstring states what the folder must not
import; it is checked against the same table, so the docs cannot drift from the rule.
"""
from __future__ import annotations

import ast
import re
import sys

import pytest

from tests.helpers.import_graph import FOLDERS, ROOT, ImportGraph, build_graph, cycles

# Layer units, top to bottom, and what each may import besides itself. engine/server is a unit of its own:
# the engine core serves the offline API too and must not depend on the gRPC front.
ALLOWED: dict[str, frozenset[str]] = {
    "benchmarks": frozenset({"engine.lora", "engine.server", "engine.api", "engine", "engine.core", "engine.rl", "engine.cluster", "engine.spec",
                             "engine.rank", "engine.multimodal", "engine.kv_transfer", "engine.spec.heads", "engine.models", "engine.tools",
                             "engine.state", "engine.contract", "engine.tp", "engine.config", "planner", "scheduler", "moe", "comm",
                             "kernels"}),
    "engine.server": frozenset({"engine.lora", "engine.api", "engine", "engine.core", "engine.rl", "engine.tools", "engine.multimodal",
                                "engine.contract",
                                "engine.config", "planner", "scheduler", "moe", "comm", "kernels"}),
    "engine.api": frozenset({"engine.lora", "engine.core", "engine.rl", "engine.cluster", "engine.multimodal", "engine.kv_transfer", "engine.tools", "engine.contract", "engine.config",
                             "planner", "scheduler", "moe", "comm", "kernels"}),
    # The package root only re-exports the public names (LLM, AsyncEngine, EngineArgs, SamplingParams, outputs).
    "engine": frozenset({"engine.api", "engine.core", "engine.contract", "engine.config",
                         "planner", "scheduler", "moe", "comm", "kernels"}),
    "engine.core": frozenset({"engine.lora", "engine.cluster", "engine.rl", "engine.multimodal", "engine.contract", "engine.config",
                              "planner", "scheduler", "moe", "comm", "kernels"}),
    # The cluster hands every rank the features its step takes as plug-ins (engine/cluster/step_features.py).
    "engine.cluster": frozenset({"engine.lora", "engine.lora.rank", "engine.prompt_logprobs", "engine.grammar", "engine.rl", "engine.spec", "engine.rank", "engine.multimodal", "engine.kv_transfer", "engine.contract",
                                 "engine.config", "planner", "scheduler", "moe", "comm", "kernels"}),
    # Speculative decoding (engine/spec/) sits above the rank: its proposers load with the rank's loader, its verify
    # step samples with the rank's sampler. The rank reaches it only through engine/contract/spec_decoding.py's
    # protocols, the implementation handed to each Worker by the cluster (engine/spec/api.SPEC_DECODING).
    "engine.spec": frozenset({"engine.lora", "engine.rank", "engine.multimodal", "engine.kv_transfer", "engine.spec.heads", "engine.models",
                              "engine.state", "engine.contract", "engine.tp", "engine.config", "planner", "scheduler", "moe", "comm",
                             "kernels"}),
    "engine.rank": frozenset({"engine.lora", "engine.rl", "engine.kv_transfer", "engine.spec.heads", "engine.models", "engine.multimodal", "engine.state",
                              "engine.contract",
                              "engine.tp", "engine.config", "planner", "scheduler", "moe", "comm", "kernels"}),
    # The KV data plane (connectors, transports, wire format, store, auth) sits below the runner, beside the models:
    # the runner calls its worker half, the API builds its connector from flags.
    "engine.kv_transfer": frozenset({"engine.contract", "engine.tp", "engine.config", "planner", "scheduler", "moe",
                                     "comm", "kernels"}),
    # Its draft heads (MTP modules, EAGLE-3 heads) are a floor of their own below the rank, built from the models'
    # parts: the rank's loader leaves a checkpoint's MTP tensors unread and its dummy checkpoints make them.
    "engine.spec.heads": frozenset({"engine.lora", "engine.models", "engine.state", "engine.contract", "engine.tp", "engine.config", "planner",
                                    "scheduler", "moe", "comm", "kernels"}),
    "engine.models": frozenset({"engine.lora", "engine.state", "engine.contract", "engine.tp", "engine.config", "planner", "scheduler", "moe", "comm",
                                "kernels"}),
    # Images into a multimodal checkpoint (engine/multimodal/): the driver's processor (engine/core calls it) and the
    # rank's vision tower (engine/rank calls it), one package on the configuration and the contract: the decoder's
    # seam (contract/forward_inputs.ImageSplice) is filled by the rank from what this package returns.
    "engine.multimodal": frozenset({"engine.contract", "engine.tp", "engine.config", "planner", "scheduler", "moe", "comm",
                                    "kernels"}),
    "engine.tools": frozenset({"engine.config", "planner", "scheduler", "moe", "comm", "kernels"}),
    # RL rollouts (engine/rl/), on the contract: the engine's control calls (held by LLMEngine, reaching the ranks
    # through the contract's rank calls), a weight update's checks and the re-quantizers (the engine core calls them,
    # the ranks re-quantize a broadcast with them), and its step plug-ins (routed experts, routing replay:
    # engine/contract/step_plugin.py). Its rank side (engine/rl/rank/) is engine/rank's (RL_RANK_PART below).
    "engine.rl": frozenset({"engine.contract", "engine.tp", "engine.config", "planner", "scheduler", "moe", "comm",
                            "kernels"}),
    # Structured output's rank half (engine/grammar/): a step plug-in on the contract.
    "engine.grammar": frozenset({"engine.contract", "engine.config", "planner", "scheduler", "moe", "comm", "kernels"}),
    # Prompt logprobs (engine/prompt_logprobs/): a step plug-in on the contract, scored with the decoder's LM head.
    "engine.prompt_logprobs": frozenset({"engine.contract", "engine.tp", "engine.config", "planner", "scheduler", "moe",
                                         "comm", "kernels"}),
    # The per-sequence layer state (engine/state/: the state pools, a step's StateStep) sits below the models that
    # read it and the rank that fills it, on the contract (its host-to-device copies).
    "engine.state": frozenset({"engine.contract", "engine.tp", "engine.config", "planner", "scheduler", "moe", "comm",
                               "kernels"}),
    # LoRA adapters (engine/lora/: adapter reading and checks, the host LRU, the device slots, the linears' hook) sit
    # beside the per-sequence state, on the contract: the driver checks requests with it, the rank fills its slots,
    # the models name only the hook's protocol (engine/models/linear.py).
    # LoRA's rank side (engine/lora/rank/plugin.py: its step plug-in) finds an adapter's targets in the models.
    "engine.lora.rank": frozenset({"engine.lora", "engine.models", "engine.state", "engine.contract", "engine.tp",
                                        "engine.config", "planner", "scheduler", "moe", "comm", "kernels"}),
    "engine.lora": frozenset({"engine.contract", "engine.tp", "engine.config", "planner", "scheduler", "moe", "comm",
                              "kernels"}),
    "engine.contract": frozenset({"engine.tp", "engine.config", "planner", "scheduler", "moe", "comm", "kernels"}),
    # Tensor parallelism (engine/tp/: the group, a rank's attention view, the sharding rules of the sharded layers)
    # sits on the configuration alone: the contract names a TensorParallel, the models build their shards with it.
    "engine.tp": frozenset({"engine.config", "planner", "scheduler", "moe", "comm", "kernels"}),
    "engine.config": frozenset({"planner", "scheduler", "moe", "comm", "kernels"}),
    "planner": frozenset({"comm"}),  # the cluster model prices links with comm.link_model
    "scheduler": frozenset(),
    "moe": frozenset({"comm", "kernels"}),
    "comm": frozenset({"kernels"}),
    "kernels": frozenset(),
}
# Imports for annotations only (`if TYPE_CHECKING:`, never run) may reach above their floor to these modules alone:
# the protocols of engine/contract that name what a configuration field holds (EngineArgs.kv_connector is a
# KVConnectorFactory, SpeculativeConfig.drafter_factory makes a HostDrafter), so the seam is typed where it is
# declared while the configuration still imports nothing above it when it runs.
TYPING_SEAMS: dict[str, frozenset[str]] = {
    "engine.config": frozenset({"engine.contract.kv_connector", "engine.contract.spec_decoding"}),
}
# The `moelink` command is the composition root: it alone in engine/ may register the server's subcommands.
COMPOSITION_ROOTS: dict[str, frozenset[str]] = {"engine.api.cli": frozenset({"engine.server"})}
# scheduler/ is pure Python (ARCHITECTURE.md: Design rules 13): standard library only, so it is unit-tested on
# plain lists.
STDLIB_ONLY = ("scheduler",)


# A model family's config modules (engine/models/<family>/config.py: its registry entries; reader.py: its config
# reader) are engine/config's: engine/config/architectures.py and hf_readers.py import them (by computed name,
# engine/config/families.py) before any model code, so they may import only what engine/config may.
FAMILY_CONFIG_PARTS = ("config", "reader")
# A family's tiny checkpoints (engine/models/<family>/tiny.py: its `moelink make-tiny-model` presets) are
# engine/tools': engine/tools/tiny_archs.py imports them (by computed name) and they build on its generic writers.
FAMILY_TOOL_PARTS = ("tiny",)
# A multimodal family's images (engine/models/<family>/vision.py: the VisionSpec of each wrapper it publishes) are
# engine/multimodal's: its VISION_SPECS registry imports them (by computed name) and they register into it.
FAMILY_MULTIMODAL_PARTS = ("vision",)
# A block kind's config module sits beside the kind's module (engine/models/gqa.py + gqa_config.py,
# engine/models/blocks/ffn.py + ffn_config.py; its config.json reader, where it is the kind's alone, + _reader.py:
# dsa_reader.py): ModelConfig and the families' readers import them, so they are engine/config's and may import only
# what engine/config may (no model code: test_reading_the_registry_and_the_readers_loads_no_model_code).
BLOCK_CONFIG_SUFFIXES = ("_config", "_reader")


def is_block_config(module: str) -> bool:
    parts = module.split(".")
    return (len(parts) in (3, 4) and parts[:2] == ["engine", "models"] and parts[-1].endswith(BLOCK_CONFIG_SUFFIXES)
            and (len(parts) == 3 or parts[2] == "blocks"))


# RL's rank side (engine/rl/rank/: the Worker's RL calls, the broadcast's receive, sleep, rollback) is engine/rank's:
# the Worker takes its calls from it and it writes through the rank's loader, so it may import only what
# engine/rank may, and the RL package keeps all of RL in one place.
RL_RANK_PART = "engine.rl.rank"


def unit_of(module: str) -> str:
    parts = module.split(".")
    if module == RL_RANK_PART or module.startswith(RL_RANK_PART + "."):
        return "engine.rank"
    if len(parts) == 4 and parts[:2] == ["engine", "models"] and parts[3] in FAMILY_CONFIG_PARTS:
        return "engine.config"
    if is_block_config(module):
        return "engine.config"
    if len(parts) == 4 and parts[:2] == ["engine", "models"] and parts[3] in FAMILY_TOOL_PARTS:
        return "engine.tools"
    if len(parts) == 4 and parts[:2] == ["engine", "models"] and parts[3] in FAMILY_MULTIMODAL_PARTS:
        return "engine.multimodal"
    return max((u for u in ALLOWED if module == u or module.startswith(u + ".")), key=len)


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return build_graph()


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_graph_sees_every_folder_and_lazy_imports(graph):
    # The checker itself: it must find modules in every folder and count imports inside functions.
    assert {unit_of(m).split(".")[0] for m in graph.files} == set(FOLDERS)
    assert "engine.cluster.ray_guard" in graph.edges["engine.cluster.ray_runtime"]  # `from . import ray_guard` in a method
    assert "engine.server.cli" in graph.edges["engine.api.cli"]  # `from .server import cli` in a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    # `if TYPE_CHECKING:` imports are typing edges, not run-time ones.
    assert "engine.contract.kv_connector" in graph.typing_edges["engine.config.engine_args"]
    assert "engine.contract.kv_connector" not in graph.edges["engine.config.engine_args"]


def _against_the_layering(graph, edges: dict[str, set[str]], seams: dict[str, frozenset[str]]) -> list[str]:
    """The edges that reach a unit ALLOWED (and COMPOSITION_ROOTS) does not give their module, less the modules
    `seams` opens to a unit, one line each with the file and line of the import."""
    bad = []
    for module, targets in sorted(edges.items()):
        unit = unit_of(module)
        allowed = ALLOWED[unit] | COMPOSITION_ROOTS.get(module, frozenset())
        for target in sorted(targets):
            target_unit = unit_of(target)
            if target_unit != unit and target_unit not in allowed and target not in seams.get(unit, ()):
                line = graph.where[(module, target)]
                bad.append(f"{graph.files[module].relative_to(ROOT)}:{line}: {unit} imports {target} ({target_unit})")
    return bad


def test_no_upward_imports(graph):
    bad = _against_the_layering(graph, graph.edges, {})
    assert not bad, "imports against the layering (tests/test_layering.py ALLOWED):\n" + "\n".join(bad)


def test_typing_only_imports_reach_no_further_than_the_seam_protocols(graph):
    bad = _against_the_layering(graph, graph.typing_edges, TYPING_SEAMS)
    assert not bad, "typing-only imports against the layering (tests/test_layering.py TYPING_SEAMS):\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    found = cycles(graph.edges)
    assert not found, "import cycles (lazy imports count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_pure_python_folders_import_only_the_standard_library(graph):
    bad = {m: sorted(ext - set(sys.stdlib_module_names) - {"__future__"})
           for m, ext in graph.external.items() if unit_of(m) in STDLIB_ONLY}
    assert not {m: e for m, e in bad.items() if e}, bad


# Model families (engine/models/<family>/, ARCHITECTURE.md rule 11): each is one package, imported by computed name
# from its line in engine/config/families.py (its config modules by engine/config, its kinds.py by
# engine/models/blocks/registry.py), so nothing else in the engine names it: the decoder, the loader, the draft heads
# and the other families never do; the benchmarks may.
FAMILY_IMPORTERS = ("benchmarks",)


def _family_packages() -> set[str]:
    return {p.parent.name for p in (ROOT / "engine" / "models").glob("*/__init__.py") if p.parent.name != "blocks"}


def test_a_model_family_is_imported_only_by_its_registry_line(graph):
    families = {f"engine.models.{name}" for name in _family_packages()}
    assert "engine.models.deepseek_v4" in families
    bad = []
    for module, targets in sorted(graph.edges.items()):
        for target in sorted(targets):
            family = next((f for f in families if target == f or target.startswith(f + ".")), None)
            if family is None or module == family or module.startswith(family + "."):
                continue
            if any(module == u or module.startswith(u + ".") for u in FAMILY_IMPORTERS):
                continue
            bad.append(f"{graph.files[module].relative_to(ROOT)}:{graph.where[(module, target)]}: imports {target}")
    assert not bad, "a model family is named outside its package and its registry line:\n" + "\n".join(bad)


def test_every_family_package_is_one_registry_line_and_has_its_config_modules():
    from moelink.engine.config.families import FAMILIES

    assert sorted(FAMILIES) == sorted(_family_packages()), "engine/config/families.py lists each engine/models/<family>/"
    assert len(set(FAMILIES)) == len(FAMILIES)
    for family in FAMILIES:
        for part in FAMILY_CONFIG_PARTS:
            assert (ROOT / "engine" / "models" / family / f"{part}.py").is_file(), f"engine/models/{family}/{part}.py"


def test_the_models_package_and_family_packages_import_nothing(graph):
    """engine/config imports the families' config modules, and with them their parent packages: those must stay
    empty of imports, or reading a config would load the decoder."""
    packages = ["engine.models", "engine.models.blocks"] + [f"engine.models.{name}" for name in sorted(_family_packages())]
    assert {p: sorted(graph.edges[p]) for p in packages if graph.edges.get(p)} == {}


@pytest.mark.slow  # a fresh interpreter, about 2 s: not in the quick loop
def test_reading_the_registry_and_the_readers_loads_no_model_code():
    """The registry (engine/config/architectures.py) imports no torch, and the config readers no model code: the
    families' modules they import by computed name are their config.py and reader.py alone."""
    import subprocess

    code = ("import sys; import moelink.engine.config.architectures; assert 'torch' not in sys.modules, 'torch'; "
            "import moelink.engine.config.hf_readers; "
            "print(sorted(m for m in sys.modules if m.startswith('moelink.engine.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    from moelink.engine.config.families import FAMILIES

    expected = {"moelink.engine.models"} | {f"moelink.engine.models.{f}" for f in FAMILIES} | {
        f"moelink.engine.models.{f}.{part}" for f in FAMILIES for part in FAMILY_CONFIG_PARTS}
    # The block kinds' config modules the readers build from (gqa_config.py, ...; the blocks package for
    # blocks/ffn_config.py, its __init__ empty of imports), and nothing else of the models.
    kinds = {m for m in loaded if is_block_config(m.removeprefix("moelink."))}
    assert "moelink.engine.models.gqa_config" in kinds and "moelink.engine.models.blocks.ffn_config" in kinds
    expected |= kinds | {"moelink.engine.models.blocks"}
    assert loaded == expected, sorted(loaded ^ expected)


_MUST_NOT = re.compile(r"^Must not import:\s*(.+?)\.?\s*$", re.M)


@pytest.mark.parametrize("unit", sorted(ALLOWED))
def test_folder_docstring_states_what_it_must_not_import(unit):
    """Each layer's `__init__.py` opens with what it owns and a line `Must not import: a, b.` (`nothing` for
    the top) naming exactly the units the table forbids it."""
    path = ROOT / unit.replace(".", "/") / "__init__.py"
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    match = _MUST_NOT.search(doc)
    assert match, f"{path.relative_to(ROOT)}: the docstring needs a line 'Must not import: ...'"
    text = re.sub(r"\(.*?\)", "", match.group(1))  # a parenthesis may say why
    stated = {name.strip(" `/").replace("/", ".") for name in text.split(",")} - {"nothing"}
    forbidden = set(ALLOWED) - ALLOWED[unit] - {unit}
    engine_units = {u for u in ALLOWED if u == "engine" or u.startswith("engine.")}
    if engine_units <= forbidden:  # a folder below the whole engine floor says just "engine"
        forbidden = (forbidden - engine_units) | {"engine"}
    assert stated == forbidden, f"{path.relative_to(ROOT)} says {sorted(stated)}, the layering says {sorted(forbidden)}"


def test_no_test_module_outside_kernels_imports_a_triton_kernel_module_at_collection():
    """Triton reads TRITON_INTERPRET when a kernel is defined, and tests/kernels/conftest.py sets it when the
    kernel tests are collected: a test module collected before it (another directory) that imports
    moelink.kernels.triton_* at its top level defines every kernel compiled-for-CUDA, and every interpreted
    kernel test in that xdist worker then fails. Such imports belong inside the tests."""
    from pathlib import Path

    root = Path(__file__).resolve().parent
    bad = []
    for path in sorted(root.rglob("test_*.py")):
        if path.parent.name == "kernels" or "helpers" in path.parts:
            continue
        for node in ast.parse(path.read_text()).body:  # top-level statements only
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith("moelink.kernels.triton")]
    assert not bad, bad


def test_test_files_have_unique_basenames():
    """The test folders have no __init__.py (rootdir-relative module names): two test files of one basename make
    pytest refuse to collect the second ("import file mismatch"), and its tests silently never run."""
    from collections import Counter
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    names = Counter(p.name for p in tests.rglob("test_*.py") if "helpers" not in p.parts)
    assert [n for n, c in names.items() if c > 1] == []
