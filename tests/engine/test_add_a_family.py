"""How to add a model family (ARCHITECTURE.md: How to add a model family), walked by a test (issue 56 item 6).

A toy family is written as a package outside the repository, in a temporary folder: its config.py registers a new
`architectures` name (a Qwen3-MoE checkpoint saved under that name, read by transformers' Qwen3-MoE config), its
reader.py reads it (Qwen3-MoE's reader, imported, not copied), its kinds.py registers one new FFN kind (the routed
experts, counted as they are built) and its tiny.py declares its tiny checkpoint (`moelink make-tiny-model --arch
toy_moe`: a Qwen3-MoE preset built by transformers, saved under the toy's name). Its one registry line is
engine/config/families.py's FAMILIES with the package's full name added, in a fresh interpreter before anything reads
the registry: no file of the repository is touched (nor pyproject.toml: the packages are found,
tests/test_packaging.py). The engine builds and runs the toy family, its sparse layers through the new kind, and its greedy tokens equal the
built-in Qwen3-MoE path's on the same weights (the kind does the same math); `make-tiny-model` lists the toy arch,
writes its checkpoint, which the engine serves, and names it among the allowed arches when refusing an unknown one.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moelink.engine.tools.tiny_model import make_tiny_model

pytestmark = pytest.mark.slow  # three engines and a tiny checkpoint in a fresh interpreter, about 10 s

ROOT = Path(__file__).resolve().parents[2]

TOY = {
    "__init__.py": '"""A toy model family: a Qwen3-MoE under a name of its own, with an FFN kind of its own."""\n',
    "config.py": '''
        """The toy family's registry entry."""
        from moelink.engine.config.arch_spec import PROJ, ArchSpec, Architecture

        ARCHITECTURES = (
            Architecture("ToyMoeForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ, ffn="toy_routed"),
                         model_type="qwen3_moe"),
        )
        ''',
    "reader.py": '''
        """The toy family's config reader: Qwen3-MoE's."""
        from moelink.engine.models.qwen3_moe.reader import read

        __all__ = ["read"]
        ''',
    "kinds.py": '''
        """The toy family's FFN kind: the routed experts, counted as they are built."""
        from moelink.engine.models.blocks.ffn import FFN, RoutedFFN

        BUILT: list[int] = []


        @FFN.register("toy_routed")
        class ToyRoutedFFN(RoutedFFN):
            def __init__(self, ctx, i):
                super().__init__(ctx, i)
                BUILT.append(i)
        ''',
    "tiny.py": '''
        """The toy family's tiny checkpoint: a Qwen3-MoE preset built by transformers, saved under the toy's name."""
        import json

        from moelink.engine.tools.tiny_families import TinyArch, save_preset

        TOY = ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True))


        def write(out, *, seed, dtype, fmt, overrides):
            save_preset(out, TOY, seed, dtype=dtype, **overrides)
            config = json.loads((out / "config.json").read_text())
            config["architectures"] = ["ToyMoeForCausalLM"]
            (out / "config.json").write_text(json.dumps(config, indent=2))


        ARCHS = {"toy_moe": TinyArch("ToyMoeForCausalLM", "the toy family (a Qwen3-MoE)", ("float",), write=write)}
        ''',
}

# In a fresh interpreter: the toy family's one registry line, then the toy checkpoint and the built-in one, greedy.
RUN = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import moelink.engine.config.families as families
families.FAMILIES = families.FAMILIES + ("toy_families.toy_moe",)

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.architectures import SUPPORTED_ARCHITECTURES

params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
prompts = [[5, 17, 3, 99, 42], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
out = {"supported": "ToyMoeForCausalLM" in SUPPORTED_ARCHITECTURES}
for name in ("toy", "base"):
    llm = LLM(sys.argv[2 if name == "toy" else 3], dtype="float64", max_num_seqs=4, num_kv_blocks=16, block_size=8)
    out[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.shutdown()
    if name == "toy":
        from toy_families.toy_moe.kinds import BUILT
        out["built"] = sorted(BUILT)

# make-tiny-model finds the toy's preset through the registry: listed, written, served; named when refusing.
import contextlib, io
from moelink.engine.api.cli import main
from moelink.engine.tools.tiny_model import make_tiny_model

listing = io.StringIO()
with contextlib.redirect_stdout(listing):
    assert main(["make-tiny-model", "--list"]) == 0
    assert main(["make-tiny-model", sys.argv[4], "--arch", "toy_moe", "--dtype", "float64"]) == 0
out["listed"] = [line.split()[:2] for line in listing.getvalue().splitlines() if line.startswith("toy_moe")]
out["tiny_config"] = json.load(open(sys.argv[4] + "/config.json"))["architectures"]
BUILT.clear()
llm = LLM(sys.argv[4], dtype="float64", max_num_seqs=4, num_kv_blocks=16, block_size=8)
out["tiny"] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
llm.shutdown()
out["tiny_built"] = sorted(BUILT)
try:
    make_tiny_model(sys.argv[4] + "-x", "no_such_arch")
except ValueError as e:
    out["refusal"] = str(e)
print(json.dumps(out))
'''


def _tree_digest() -> str:
    """The engine's files and the package list as git sees them (tracked and untracked): the toy family must change
    none."""
    where = ["--", "engine", "pyproject.toml", "setup.py"]
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", *where], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    diff = subprocess.run(["git", "diff", "HEAD", *where], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return hashlib.sha256((status + diff).encode()).hexdigest()


def test_a_toy_family_added_outside_the_repository_runs(tmp_path):
    before = _tree_digest()
    package = tmp_path / "pkgs" / "toy_families" / "toy_moe"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    for name, text in TOY.items():
        (package / name).write_text(textwrap.dedent(text).lstrip())
    base = make_tiny_model(tmp_path / "base", "qwen3_moe", num_layers=2, seed=3)
    toy = tmp_path / "toy"
    shutil.copytree(base, toy)
    config = json.loads((toy / "config.json").read_text())
    config["architectures"] = ["ToyMoeForCausalLM"]
    (toy / "config.json").write_text(json.dumps(config))

    tiny = tmp_path / "toy_tiny"
    done = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "pkgs"), str(toy), str(base), str(tiny)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["supported"]
    assert out["built"] == [0, 1]  # both layers are sparse: each built through the toy kind
    assert out["toy"] == out["base"] and len({t for ts in out["toy"] for t in ts}) > 3
    # The toy's tiny preset, from its own folder: listed, written under its name, served through its kind.
    assert out["listed"] == [["toy_moe", "ToyMoeForCausalLM"]]
    assert out["tiny_config"] == ["ToyMoeForCausalLM"] and (tiny / "tokenizer.json").is_file()
    assert out["tiny_built"] == [0, 1] and all(len(ts) == 6 for ts in out["tiny"])
    assert "arch='no_such_arch' is invalid" in out["refusal"] and "qwen3_moe" in out["refusal"]
    assert "toy_moe" in out["refusal"]
    assert _tree_digest() == before
