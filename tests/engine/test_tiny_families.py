"""`moelink make-tiny-model --arch NAME [--format FORMAT]` (issue 54 item 6): every family moelink serves, in every
format moelink reads it in, one command away, written by the builders the tests use (each family's
engine/models/<family>/tiny.py, engine/tools/tiny_families.py, tiny_formats.py: tests/helpers/*_checkpoints.py name
them, no second copy).

Oracles: the registry (every runnable architecture is some arch's config.json `architectures`, or its text model);
LLM(...) loads each (arch, format) checkpoint and generates; for the archs make-tiny-model gained, greedy tokens equal
transformers' in float64 (its forward without a cache for the DeepSeek Sparse Attention families, whose definition it
is; Kimi K2's INT4 checkpoint through transformers' own compressed-tensors integration)."""
from __future__ import annotations

import json
import shutil

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.architectures import SUPPORTED_ARCHITECTURES, TEXT_MODEL_OF
from moelink.engine.tools import tiny_archs
from moelink.engine.tools.tiny_model import ARCHS, FORMATS, make_tiny_model

from tests.helpers.parity import engine_greedy, hf_greedy, hf_greedy_nocache, prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

PAIRS = [(arch, fmt) for arch, a in tiny_archs.ARCHS.items() for fmt in a.formats]
# quantization_config.quant_method each format writes
QUANT_METHOD = {"fp8": "fp8", "mxfp4": "mxfp4", "int4": "compressed-tensors", "gptq": "gptq", "awq": "awq",
                "nvfp4": "modelopt", "published": "fp8",
                ("kimi_k3", "published"): "compressed-tensors"}  # a family's own format named as another's
# The archs make-tiny-model did not offer before issue 54 (it had qwen3_moe, mixtral, deepseek_v3, deepseek_v2 and
# glm4_moe), with their transformers oracle: "cached" generate, or "nocache" (DSA's definition).
NEW = {"deepseek_v32": "nocache", "glm_moe_dsa": "nocache", "qwen3_next": "cached", "qwen3_5_moe": "cached",
       "minimax_m2": "cached", "mimo_v2_flash": "cached", "gpt_oss": "cached", "deepseek_v4": "cached",
       "kimi_k2": "cached"}
ENGINE_KW = dict(max_num_seqs=4, max_num_batched_tokens=48, num_kv_blocks=96, block_size=8)


def test_list_names_every_arch_and_format(capsys):
    from moelink.engine.api.cli import main

    assert main(["make-tiny-model", "--list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for arch, a in tiny_archs.ARCHS.items():
        assert a.architecture in lines[arch] and " ".join(a.formats) in lines[arch], arch
    assert set(FORMATS) <= set(lines)
    assert set(ARCHS) == set(tiny_archs.ARCHS) and len(ARCHS) >= 15
    # Every architecture moelink runs is some arch's (a multimodal wrapper stands for its text model).
    offered = {a.architecture for a in tiny_archs.ARCHS.values()}
    offered |= {TEXT_MODEL_OF[a] for a in offered if a in TEXT_MODEL_OF}
    assert set(SUPPORTED_ARCHITECTURES) <= offered, set(SUPPORTED_ARCHITECTURES) - offered
    # And every format is some arch's.
    assert {f for a in tiny_archs.ARCHS.values() for f in a.formats} == set(FORMATS)


def test_cli_writes_a_preset_family_in_a_format(tmp_path, capsys):
    from moelink.engine.api.cli import main

    out = tmp_path / "next"
    assert main(["make-tiny-model", str(out), "--arch", "qwen3_next", "--format", "int4", "--set", "num_experts=4",
                 "--int4-zero-point"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3NextForCausalLM"] and cfg["num_experts"] == 4
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["config_groups"]["group_0"]["weights"]["symmetric"] is False
    assert main(["make-tiny-model", "--arch", "qwen3_next"]) == 2
    assert "needs OUT" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, field", [
    (dict(arch="qwen3_next", num_layers=3), "num_layers"),
    (dict(arch="deepseek_v4", hidden_size=64), "hidden_size"),
    (dict(arch="gpt_oss", format="int4"), "format"),
    (dict(arch="kimi_linear", format="fp8"), "format"),
    (dict(arch="qwen3_moe", format="published"), "format"),
    (dict(arch="minimax_m2", vocab_size=10), "vocab_size"),
    (dict(arch="mimo_v2_flash", mlp_only_layers=(1,)), "mlp_only_layers"),
    (dict(arch="deepseek_v3", format="int4", int4_group=48), "int4_group"),
    (dict(arch="qwen3_next", format="int4", int4_group=16), "int4_group"),
])
def test_invalid_arguments_name_the_field(tmp_path, kwargs, field):
    arch = kwargs.pop("arch")
    with pytest.raises(ValueError, match=rf"\b{field}="):
        make_tiny_model(tmp_path / "x", arch, **kwargs)
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == [], "nothing is left behind"


def test_the_tests_build_with_the_package():
    """The helpers name the package's builders and the families' presets: one copy, the one make-tiny-model runs."""
    from moelink.engine.models.deepseek import tiny as deepseek
    from moelink.engine.models.deepseek_v4 import tiny as deepseek_v4
    from moelink.engine.models.gpt_oss import tiny as gpt_oss
    from moelink.engine.models.mimo_v2_flash import tiny as mimo_v2_flash
    from moelink.engine.models.minimax_m2 import tiny as minimax_m2
    from moelink.engine.models.qwen3_next import tiny as qwen3_next
    from moelink.engine.tools import tiny_formats
    from tests.helpers import (dsv4_checkpoint, dsv4_published, gpt_oss_checkpoints, hf_checkpoints, int4_checkpoints,
                               m2_checkpoints)

    assert hf_checkpoints.HF_DSA is deepseek.HF_DSA and hf_checkpoints.HF_HYBRID is qwen3_next.HF_HYBRID
    assert m2_checkpoints.M2_TINY == {"minimax": minimax_m2.MINIMAX, "mimo": mimo_v2_flash.MIMO}
    assert gpt_oss_checkpoints.save_gpt_oss is gpt_oss.save_gpt_oss
    assert dsv4_checkpoint.save_dsv4_checkpoint is deepseek_v4.save_dsv4_checkpoint
    assert dsv4_published.write_published_dsv4 is deepseek_v4.write_published_dsv4
    assert int4_checkpoints.int4_checkpoint is tiny_formats.int4_checkpoint
    assert int4_checkpoints.kimi_k25_checkpoint is deepseek.kimi_k25_checkpoint


def test_the_archs_are_the_families_own():
    """`--arch` names are gathered from each family's tiny.py, in the registry's order; an unknown one is refused with
    every name."""
    from moelink.engine.config.families import FAMILIES

    owners = [f for f in FAMILIES for name in tiny_archs.ARCHS
              if name in __import__(f"moelink.engine.models.{f}.tiny", fromlist=["ARCHS"]).ARCHS]
    assert len(owners) == len(tiny_archs.ARCHS) and owners == sorted(owners, key=FAMILIES.index)
    with pytest.raises(ValueError, match="arch='nope' is invalid: must be one of qwen3_moe, mixtral, .*mimo_v2_flash"):
        make_tiny_model("unused", "nope")


@pytest.mark.parametrize("arch,fmt", PAIRS, ids=[f"{a}-{f}" for a, f in PAIRS])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_every_arch_in_every_format_loads_and_generates(tmp_path, arch, fmt):
    path = make_tiny_model(tmp_path / "m", arch, format=None if fmt == tiny_archs.default_format(arch) else fmt)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [tiny_archs.ARCHS[arch].architecture]
    if fmt == "float":
        assert "quantization_config" not in cfg
    else:
        # at the top, or where a multimodal wrapper publishes it: in its text model's config (Kimi K3)
        quant = cfg.get("quantization_config") or cfg["text_config"]["quantization_config"]
        assert quant["quant_method"] == QUANT_METHOD.get((arch, fmt), QUANT_METHOD[fmt])
    assert (path / "tokenizer.json").is_file() and (path / "generation_config.json").is_file()
    with LLM(str(path), dtype="float32", **ENGINE_KW) as llm:
        out = llm.generate(["Hello, my name is", "def fib(n):"],
                           SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    for o in out:
        ids = o.outputs[0].token_ids
        assert len(ids) == 3 and all(0 <= t < _vocab(cfg) for t in ids)
        assert isinstance(o.outputs[0].text, str)


def _vocab(cfg: dict) -> int:
    return cfg.get("vocab_size") or cfg["text_config"]["vocab_size"]


def _oracle_dir(path, tmp_path):
    """transformers reads Kimi K2's model_type as nothing it knows: the same files under deepseek_v3."""
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") != "kimi_k2":
        return str(path)
    oracle = tmp_path / "oracle"
    shutil.copytree(path, oracle)
    (oracle / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v3"}))
    return str(oracle)


@pytest.mark.parametrize("arch", sorted(NEW))
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_new_archs_greedy_equals_transformers_in_float64(tmp_path, arch):
    path = make_tiny_model(tmp_path / "m", arch, dtype="float64")
    ps = prompts(_vocab(json.loads((path / "config.json").read_text())), seed=len(arch), n=3, lo=1, hi=40)
    with LLM(str(path), dtype="float64", **ENGINE_KW) as llm:
        got = engine_greedy(llm, ps, 4)
    oracle = _oracle_dir(path, tmp_path)
    if arch == "kimi_k2":  # INT4 experts: transformers' compressed-tensors integration decompresses them (float32)
        import torch
        from transformers import AutoModelForCausalLM

        from tests.helpers.fp8_checkpoints import hf_greedy_with

        hf = AutoModelForCausalLM.from_pretrained(oracle, dtype=torch.float64, experts_implementation="eager")
        want = hf_greedy_with(hf.to(torch.float64).eval(), ps, 4)
    else:
        want = (hf_greedy_nocache if NEW[arch] == "nocache" else hf_greedy)(oracle, ps, 4)
    assert got == want
    assert len({t for g in got for t in g}) > 3, "degenerate model"


def test_kimi_k25_serves_kimi_k2s_tokens(tmp_path):
    """The same seed: Kimi K2.5's wrapper (text model under language_model., a vision tower beside) around Kimi K2's
    INT4 text model gives its tokens."""
    ps = prompts(400, seed=3, n=2, lo=1, hi=20)
    got = []
    for arch in ("kimi_k2", "kimi_k25"):
        with LLM(str(make_tiny_model(tmp_path / arch, arch, dtype="float64")), dtype="float64", **ENGINE_KW) as llm:
            got.append(engine_greedy(llm, ps, 4))
    assert got[0] == got[1]


def test_a_preset_family_in_shards_gives_the_same_tokens(tmp_path):
    whole = make_tiny_model(tmp_path / "whole", "mimo_v2_flash")
    sharded = make_tiny_model(tmp_path / "sharded", "mimo_v2_flash", max_shard_size=40_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (sharded / "model.safetensors").exists()
    ps = prompts(400, seed=5, n=2, lo=1, hi=20)
    got = []
    for path in (whole, sharded):
        with LLM(str(path), dtype="float32", **ENGINE_KW) as llm:
            got.append(engine_greedy(llm, ps, 3))
    assert got[0] == got[1]
