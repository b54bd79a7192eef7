"""config.json as transformers writes it: checkpoints saved by the installed transformers load and match,
DeepSeek-style configs are read into their routing, attention kind and rope (the scale and rope tables are
transformers' own numbers), bad values name their field. (Parity of the DeepSeek / GLM models themselves:
test_model_families.py.)

The checkpoints here are built by transformers itself (random init, `save_pretrained`), not by
moelink's tiny_model writer, so nothing in them is hand-edited: transformers 5 writes Qwen3-MoE's expert
count as `num_local_experts` and, with save_original_format=False, experts fused into 3-D tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config.model import CONFIG_ONLY_ARCHITECTURES, SUPPORTED_ARCHITECTURES, ModelConfig
from moelink.engine.models.gqa_config import GQAConfig
from moelink.engine.models.mla_config import MLAConfig
from moelink.engine.models.rope_config import RopeConfig
from moelink.engine.rank.loader import checkpoint_index, load_model
from moelink.engine.models.registry import ARCHITECTURES
from moelink.engine.tools.tiny_corpus import train_tiny_tokenizer, write_tokenizer_configs
from moelink.kernels.ops import ReferenceKernels
from moelink.moe.layer import ExpertParallel
from moelink.moe.placement import ExpertPlacement
from moelink.moe.router import RouterConfig, SigmoidGroupLimitedRouter, SoftmaxGroupLimitedRouter, make_router

from tests.helpers.parity import engine_greedy, hf_greedy
from tests.helpers.parity import prompts as _prompts

transformers = pytest.importorskip("transformers")

VOCAB, MAX_POS = 400, 512
CPU = torch.device("cpu")


def _hf_config(arch: str):
    if arch == "qwen3_moe":
        # norm_topk_prob False and a dense layer: both read from the file, not assumed.
        return transformers.Qwen3MoeConfig(
            vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3,
            mlp_only_layers=[1], norm_topk_prob=False, max_position_embeddings=MAX_POS, initializer_range=0.1)
    return transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, num_local_experts=5, num_experts_per_tok=3, max_position_embeddings=MAX_POS,
        initializer_range=0.1)


_SAVED: dict = {}


def _saved(tmp_path_factory, arch: str, fused: bool = False) -> str:
    """A random `arch` model saved by transformers (qwen3_moe in float32, mixtral in float64) + tokenizer."""
    key = (arch, fused)
    if key not in _SAVED:
        torch.manual_seed(0)
        cls = transformers.Qwen3MoeForCausalLM if arch == "qwen3_moe" else transformers.MixtralForCausalLM
        model = cls(_hf_config(arch)).to(torch.float32 if arch == "qwen3_moe" else torch.float64)
        out = tmp_path_factory.mktemp(f"hf_{arch}_{'fused' if fused else 'per_expert'}")
        model.save_pretrained(out, save_original_format=not fused)
        tok = train_tiny_tokenizer(VOCAB)
        tok.save(str(out / "tokenizer.json"))
        write_tokenizer_configs(out, tok, MAX_POS)
        _SAVED[key] = str(out)
    return _SAVED[key]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_checkpoint_saved_by_transformers_loads_and_matches(tmp_path_factory, arch):
    path = _saved(tmp_path_factory, arch)
    raw = json.loads((Path(path) / "config.json").read_text())
    assert raw["num_local_experts"] and "num_experts" not in raw  # the alias Qwen3-MoE used to fail on
    cfg = ModelConfig.from_pretrained(path, "float64")
    assert cfg.num_experts == raw["num_local_experts"]
    if arch == "qwen3_moe":
        assert cfg.sparse_layers == (0, 2) and cfg.moe.router == RouterConfig(6, 3, norm_topk_prob=False)
    prompts = _prompts(VOCAB, seed=5, n=6, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48, num_kv_blocks=128, block_size=16)
    got = engine_greedy(llm, prompts)
    assert len({t for out in got for t in out}) > 5, "degenerate model: greedy outputs barely vary"
    assert got == hf_greedy(path, prompts)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_fused_expert_layout_loads_the_same_weights(tmp_path_factory, arch):
    per_expert, fused = _saved(tmp_path_factory, arch), _saved(tmp_path_factory, arch, fused=True)
    cfg_a, cfg_b = (ModelConfig.from_pretrained(p, "float64") for p in (per_expert, fused))
    E = cfg_a.num_experts
    fused_names = checkpoint_index(fused).keys()
    assert "model.layers.0.mlp.experts.down_proj" in fused_names  # [E, D, I], as transformers 5 holds it
    # Whole model, then one EP rank with a contiguous run of experts, then one whose experts are not
    # contiguous (a replica of expert 0 on the last rank).
    placements = [None, (ExpertPlacement(E, 2), 1), (ExpertPlacement(E, 2, replicas=[0]), 1)]
    for placed in placements:
        ep = None
        if placed is not None:
            placement, rank = placed
            ep = ExpertParallel(rank, 2, placement, None, placement.to_tensors("cpu"))
        a = load_model(cfg_a, ReferenceKernels(), CPU, ep).state_dict()
        model_b = load_model(cfg_b, ReferenceKernels(), CPU, ep)
        plan = model_b.weight_plan(fused_names)
        assert "model.layers.0.mlp.experts.gate_up_proj" in plan and not any(".experts.0." in n for n in plan)
        b = model_b.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert ExpertPlacement(E, 2, replicas=[0]).experts_on_rank(1)[-1] == 0


def test_every_runnable_architecture_has_a_spec():
    assert set(SUPPORTED_ARCHITECTURES) == set(ARCHITECTURES)
    assert not set(CONFIG_ONLY_ARCHITECTURES) & set(ARCHITECTURES)


# -- configs read, not run ------------------------------------------------------------------------------

def _config_dir(tmp_path, arch: str, **fields) -> str:
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
                  num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=MAX_POS)
    if arch == "deepseek_v3":
        cfg = transformers.DeepseekV3Config(**common, n_routed_experts=12, num_experts_per_tok=3, n_group=4,
                                            topk_group=2, first_k_dense_replace=1, n_shared_experts=1)
    elif arch == "deepseek_v2":
        cfg = transformers.DeepseekV2Config(**common, n_routed_experts=12, num_experts_per_tok=4, n_group=3,
                                            topk_group=1, topk_method="group_limited_greedy",
                                            routed_scaling_factor=16.0, first_k_dense_replace=1)
    else:
        cfg = transformers.Glm4MoeConfig(**common, n_routed_experts=8, num_experts_per_tok=2, num_key_value_heads=2)
    cfg.architectures = [{"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                          "glm4_moe": "Glm4MoeForCausalLM"}[arch]]
    cfg.save_pretrained(tmp_path)
    if fields:
        path = tmp_path / "config.json"
        raw = json.loads(path.read_text())
        raw.update(fields)
        path.write_text(json.dumps(raw))
    return str(tmp_path)


def test_deepseek_v3_config(tmp_path):
    # The routing fields DeepSeek's published config.json carries beside what transformers writes.
    path = _config_dir(tmp_path, "deepseek_v3", scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1)
    cfg = ModelConfig.from_pretrained(path, require_runnable=False)
    assert cfg.architecture == "DeepseekV3ForCausalLM" and cfg.num_experts == 12 and cfg.top_k == 3
    assert cfg.moe.router == RouterConfig(12, 3, "sigmoid", "noaux_tc", 4, 2, True, 2.5, float32_logits=True)
    assert (cfg.moe.n_shared_experts, cfg.moe.first_k_dense_replace) == (1, 1)
    assert cfg.sparse_layers == (1, 2, 3) and cfg.intermediate_size == 96 and cfg.moe_intermediate_size == 16
    assert cfg.num_kv_heads == cfg.num_heads  # MLA: one key/value per query head
    assert cfg.hf_config["kv_lora_rank"] == 512  # transformers' defaults are filled in
    assert type(make_router(cfg.moe.router)) is SigmoidGroupLimitedRouter
    # transformers' defaults: q LoRA 1536, latent 512 + rope 64, nope 128, v 128, interleaved plain rope.
    assert cfg.attention == MLAConfig(4, 1536, 512, 128, 64, 128, RopeConfig(64, 10000.0, "default", "interleaved"),
                                      softmax_scale=192**-0.5)


@pytest.mark.parametrize("rope", [
    # DeepSeek-V3 / Kimi K2's published rope_scaling, and DeepSeek-V2-Lite's (mscale 0.707 both).
    {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0,
     "beta_fast": 32, "beta_slow": 1},
    {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 0.707,
     "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
    {"type": "yarn", "factor": 4, "original_max_position_embeddings": 128, "mscale": 1.0, "mscale_all_dim": 0.8},
    None,
])
@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_mla_scale_and_rope_are_transformers(tmp_path, arch, rope):
    """The softmax scale and the rotary table are transformers' own numbers (yarn's inverse frequencies,
    attention factor and mscale_all_dim scale included), read from the config file it wrote."""
    from moelink.engine.models.rope import RotaryEmbedding

    fields = {"rope_scaling": rope, "rope_parameters": None, "max_position_embeddings": 163840} if rope else {}
    path = _config_dir(tmp_path, arch, **fields)
    cfg = ModelConfig.from_pretrained(path, require_runnable=False)
    hf = transformers.AutoConfig.from_pretrained(path)
    mod = {"deepseek_v3": transformers.models.deepseek_v3.modeling_deepseek_v3,
           "deepseek_v2": transformers.models.deepseek_v2.modeling_deepseek_v2}[arch]
    attn_cls, rope_cls = ((mod.DeepseekV3Attention, mod.DeepseekV3RotaryEmbedding) if arch == "deepseek_v3"
                          else (mod.DeepseekV2Attention, mod.DeepseekV2RotaryEmbedding))
    assert cfg.attention.softmax_scale == attn_cls(hf, 0).scaling
    assert cfg.attention.rope.rope_type == ("yarn" if rope else "default")
    ours = RotaryEmbedding(cfg.attention.rope, cfg.hf_config, 4096, ReferenceKernels())
    pos = torch.arange(0, 4096, 37)
    theirs = rope_cls(hf)(torch.zeros(1, dtype=torch.float32), pos[None])
    if arch == "deepseek_v3":
        half = cfg.attention.qk_rope_head_dim // 2
        cos, sin = theirs
        want = torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=-1)
    else:  # complex64 exp(i * angle) * attention factor
        want = theirs[0]
    torch.testing.assert_close(ours.table_PR[pos], want, rtol=2e-7, atol=2e-7)


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2", "longcat_flash", "bailing_hybrid", "hy_v4"])
def test_the_yarn_softmax_scale_is_each_familys_own(family):
    """engine/config/reader_parts.yarn_apply_mscale is, bit for bit, the copy in each MLA family's modeling file
    that the readers used to import (factor above, at and below 1; mscale_all_dim set, zero, absent; no rope_type)."""
    import importlib
    import itertools

    from moelink.engine.config.reader_parts import yarn_apply_mscale

    theirs = importlib.import_module(f"transformers.models.{family}.modeling_{family}").yarn_apply_mscale
    for rope_type, factor, mscale_all_dim, dims in itertools.product(
            ("yarn", "default", None), (40, 4.0, 1, 0.5), (1.0, 0.707, 0.8, 0, None), (192, 96, 80)):
        rope = {k: v for k, v in (("rope_type", rope_type), ("factor", factor), ("mscale_all_dim", mscale_all_dim))
                if v is not None}
        assert yarn_apply_mscale(rope, dims ** -0.5) == theirs(rope, dims ** -0.5), rope


def test_config_readers_stay_off_transformers_modeling_files():
    """A config reader imports no transformers modeling file: one import of any pulls in transformers' whole
    modeling stack (torch's compiler and distributed tensors, generation), ~3 s of CPU at every server and rank
    start of the family, as the MLA readers did for yarn's softmax scale."""
    import ast

    root = Path(__file__).resolve().parents[2] / "engine"
    offenders = []
    for path in [*root.glob("models/*/reader.py"), *root.glob("config/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and ".modeling_" in f".{node.module}":
                offenders.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.module}")
    assert not offenders, offenders


def test_deepseek_v2_and_glm4_moe_configs(tmp_path):
    v2 = ModelConfig.from_pretrained(_config_dir(tmp_path / "v2", "deepseek_v2"), require_runnable=False)
    assert v2.moe.router == RouterConfig(12, 4, "softmax", "group_limited_greedy", 3, 1, False, 16.0, True)
    assert type(make_router(v2.moe.router)) is SoftmaxGroupLimitedRouter
    glm = ModelConfig.from_pretrained(_config_dir(tmp_path / "glm", "glm4_moe"), require_runnable=False)
    assert glm.moe.router == RouterConfig(8, 2, "sigmoid", "noaux_tc", 1, 1, True, 1.0, True)
    assert glm.num_kv_heads == 2 and glm.sparse_layers == (1, 2, 3)
    # GLM: GQA rotating half of each 16-wide head (transformers' default partial_rotary_factor 0.5).
    assert glm.attention == GQAConfig(4, 2, 16, RopeConfig(8, 10000.0), qk_norm=False, qkv_bias=False)
    assert v2.attention.rope.style == "complex" and v2.attention.q_lora_rank == 1536


def test_config_only_architectures_refuse_to_run(tmp_path, monkeypatch):
    # Every known architecture runs today; a config-only one (read, not built) is simulated by taking GLM-4-MoE
    # out of the runnable lists.
    from moelink.engine.config import model as config_module
    from moelink.engine.models import registry as models_module

    monkeypatch.setattr(config_module, "SUPPORTED_ARCHITECTURES",
                        tuple(a for a in SUPPORTED_ARCHITECTURES if a != "Glm4MoeForCausalLM"))
    monkeypatch.setattr(models_module, "ARCHITECTURES",
                        {a: s for a, s in ARCHITECTURES.items() if a != "Glm4MoeForCausalLM"})
    path = _config_dir(tmp_path, "glm4_moe")
    with pytest.raises(ValueError, match=r"config read, model definition not available in this build"):
        ModelConfig.from_pretrained(path)
    cfg = ModelConfig.from_pretrained(path, require_runnable=False)
    with pytest.raises(ValueError, match=rf"architecture {cfg.architecture}: config read, model definition not available"):
        load_model(cfg, ReferenceKernels(), CPU)
    with pytest.raises(ValueError, match="model definition not available"):
        LLM(path)


@pytest.mark.parametrize("arch,fields,match", [
    ("deepseek_v3", dict(scoring_func="softmax"), r"scoring_func='softmax' is not supported for DeepseekV3ForCausalLM .*allowed: 'sigmoid'"),
    ("glm4_moe", dict(topk_method="greedy"), r"topk_method='greedy' is not supported for Glm4MoeForCausalLM: allowed: 'noaux_tc'"),
    ("deepseek_v2", dict(topk_method="top1"), r"topk_method='top1' .*allowed: 'greedy', 'group_limited_greedy'"),
    ("deepseek_v2", dict(norm_topk_prob=True), r"norm_topk_prob=True .*never renormalises.*allowed: False"),
    ("deepseek_v3", dict(moe_layer_freq=2), r"moe_layer_freq=2 .*allowed: 1"),
    ("deepseek_v3", dict(n_group=5), r"n_group=5 .*divides the 12 routed experts"),
    ("deepseek_v3", dict(topk_group=5), r"topk_group=5 .*\[1, n_group=4\]"),
    ("deepseek_v3", dict(num_experts_per_tok=7), r"num_experts_per_tok=7 .*the 6 experts of the topk_group=2 chosen groups"),
    ("deepseek_v3", dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported .*allowed: 'silu'"),
    ("deepseek_v3", dict(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
     r"quantization_config.quant_method='bitsandbytes' is not supported .*allowed: 'fp8', 'mxfp4'"),
    ("deepseek_v2", dict(mlp_bias=True), r"mlp_bias=True is not supported for DeepseekV2ForCausalLM .*allowed: False"),
    ("glm4_moe", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1}),
     r"partial_rotary_factor=0.1 is not supported: allowed: a factor in \(0, 1\] giving an even rotary width"),
    ("glm4_moe", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                                       "long_factor": [1.0] * 4, "original_max_position_embeddings": 128}),
     r"rope_parameters.rope_type .*='longrope' is not supported: allowed: 'default', 'yarn'"),
    ("glm4_moe", dict(n_group=3), r"n_group=3 .*divides the 8 routed experts"),
    ("deepseek_v3", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}),
     r"rope_parameters.rope_type \(rope_scaling.rope_type or rope_scaling.type in older files\)='dynamic' is not "
     r"supported: allowed: 'default', 'yarn'"),
    ("deepseek_v3", dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_parameters=None),
     r"rope_parameters.rope_type .*='linear' is not supported"),
])
def test_unsupported_values_name_the_field(tmp_path, arch, fields, match):
    with pytest.raises(ValueError, match=r"config\.json " + match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, arch, **fields), require_runnable=False)


@pytest.mark.parametrize("name,fields,match", [
    ("qwen3_e6k3", dict(use_sliding_window=True, sliding_window=64), r"use_sliding_window=True"),
    ("qwen3_e6k3", dict(attention_bias=True), r"attention_bias=True .*allowed: False"),
    ("mixtral_e5k3", dict(sliding_window=64), r"sliding_window=64 .*allowed: None"),
    ("mixtral_e5k3", dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
                          rope_scaling=None), r"rope_parameters\.rope_type .*='linear'"),
])
def test_attention_variants_moelink_does_not_run(tiny_model, tmp_path, name, fields, match):
    src = Path(tiny_model(name)) / "config.json"
    raw = json.loads(src.read_text()) | fields
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"config\.json " + match):
        ModelConfig.from_pretrained(str(tmp_path))


def test_unreadable_config_is_one_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"],
                                                      "model_type": "mixtral", "hidden_size": "big"}))
    with pytest.raises(ValueError, match=r"transformers could not read config\.json"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_kimi_k2_model_type_reads_as_deepseek_v3_without_running_its_code(hf_tiny_model, tmp_path, monkeypatch):
    """Kimi K2 ships `model_type: kimi_k2` (unknown to transformers) with an `auto_map` to its own Python code:
    the config is read through DeepSeek-V3's class, the checkpoint's code never runs, nothing asks on stdin."""
    import shutil

    src = Path(hf_tiny_model("dsv3_lora"))
    kimi = tmp_path / "kimi"
    shutil.copytree(src, kimi)
    raw = json.loads((kimi / "config.json").read_text())
    raw.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                               "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (kimi / "config.json").write_text(json.dumps(raw))
    (kimi / "configuration_deepseek.py").write_text("raise SystemExit('checkpoint code ran')\n")
    monkeypatch.setattr("sys.stdin", None)  # a prompt for trust_remote_code would fail here
    cfg = ModelConfig.from_pretrained(str(kimi), dtype="float64")
    assert cfg.architecture == "DeepseekV3ForCausalLM" and cfg.hf_config["model_type"] == "deepseek_v3"
    ps = _prompts(VOCAB, seed=7, n=3, hi=40)
    assert engine_greedy(LLM(str(kimi), dtype="float64"), ps) == engine_greedy(LLM(str(src), dtype="float64"), ps)


def test_kimi_k2_reads_as_deepseek_v3_whatever_transformers_registers(hf_tiny_model, tmp_path, monkeypatch):
    """Which config class reads `kimi_k2` is moelink's choice, not the order of transformers' tables: a
    transformers that maps DeepseekV3ForCausalLM to another model_type last (5.24's sarvam_mla did), or that
    registers `kimi_k2` itself under another class, still reads it as DeepSeek-V3."""
    import shutil

    from transformers.models.auto import configuration_auto, modeling_auto

    kimi = tmp_path / "kimi"
    shutil.copytree(Path(hf_tiny_model("dsv3_lora")), kimi)
    raw = json.loads((kimi / "config.json").read_text())
    (kimi / "config.json").write_text(json.dumps({**raw, "model_type": "kimi_k2"}))
    causal = {**modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "zz_decoy_mla": "DeepseekV3ForCausalLM"}
    monkeypatch.setattr(modeling_auto, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", causal)
    names = {**configuration_auto.CONFIG_MAPPING_NAMES, "kimi_k2": "Qwen3MoeConfig"}
    monkeypatch.setattr(configuration_auto, "CONFIG_MAPPING_NAMES", names)
    cfg = ModelConfig.from_pretrained(str(kimi), dtype="float64")
    assert cfg.hf_config["model_type"] == "deepseek_v3" and cfg.attention.kind == "mla"


# Published architectures transformers 5.24 defines no class of: their model_type (sarvam_moe, sarvam_mla) maps to
# the class that runs them, on the family's own config class.
_RUN_AS = {"SarvamMoEForCausalLM": "Glm4MoeForCausalLM", "SarvamMLAForCausalLM": "DeepseekV3ForCausalLM"}


def test_the_registry_names_transformers_model_type_of_each_architecture():
    """Each architecture's model_type is one transformers reads into that architecture (the alias targets too)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from moelink.engine.config.architectures import MODEL_TYPE_ALIASES, OWN_CONFIGS, REGISTRY, TEXT_MODEL_OF

    for name, a in REGISTRY.items():
        if a.alias_of:  # another name of a registered model (vLLM's ExaoneMoEForCausalLM): read as that model is
            assert a.model_type == REGISTRY[a.alias_of].model_type and not REGISTRY[a.alias_of].alias_of, name
            continue
        if name == "KimiK3ForCausalLM":  # no transformers model: its text_config read by Kimi Linear's config class
            assert a.model_type == "kimi_linear" and a.model_type in CONFIG_MAPPING_NAMES
            continue
        if a.model_type in OWN_CONFIGS and a.model_type not in CONFIG_MAPPING_NAMES:
            continue  # its family reads it (DeepSeek-V4.1's) until a transformers release defines it
        if name in TEXT_MODEL_OF.values() and a.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            # the text model of a multimodal class alone (GLM-5.3-Flash): transformers reads its text_config
            assert a.model_type in CONFIG_MAPPING_NAMES, (name, a.model_type)
            continue
        if name in _RUN_AS:  # a published name transformers runs as another class (its model_type's config reads it)
            assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(a.model_type) == _RUN_AS[name], (name, a.model_type)
            continue
        assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(a.model_type) == name, (name, a.model_type)
    assert set(MODEL_TYPE_ALIASES.values()) <= {a.model_type for a in REGISTRY.values()}


def test_kimi_k25_text_model_reads_as_deepseek_v3(hf_tiny_model, tmp_path):
    """Kimi K2.5 is multimodal (`kimi_k25`): its text_config (model_type kimi_k2) is the DeepSeek-V3 text model,
    read with the same fields as the plain checkpoint, and served from that checkpoint as its text model (its tensors
    under language_model.: architectures.TEXT_WEIGHTS_PREFIX)."""
    src = Path(hf_tiny_model("dsv3_lora"))
    raw = json.loads((src / "config.json").read_text())
    k25 = tmp_path / "k25"
    k25.mkdir()
    text = {k: v for k, v in raw.items() if k not in ("architectures", "auto_map")}
    (k25 / "config.json").write_text(json.dumps({
        "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
        "text_config": {**text, "model_type": "kimi_k2"}, "vision_config": {}}))
    cfg = ModelConfig.from_pretrained(str(k25), dtype="float64", require_runnable=False)
    plain = ModelConfig.from_pretrained(str(src), dtype="float64")
    assert cfg.architecture == "DeepseekV3ForCausalLM" and cfg.hf_config["model_type"] == "deepseek_v3"
    for f in ("num_layers", "hidden_size", "num_experts", "top_k", "num_heads", "vocab_size", "attention", "moe"):
        assert getattr(cfg, f) == getattr(plain, f), f
    assert ModelConfig.from_pretrained(str(k25), dtype="float64").text_weights_prefix.startswith("language_model.")
    (k25 / "config.json").write_text(json.dumps({"architectures": ["KimiK25ForConditionalGeneration"],
                                                 "model_type": "kimi_k25", "text_config": "x"}))
    with pytest.raises(ValueError, match="needs a text_config object"):
        ModelConfig.from_pretrained(str(k25), dtype="float64", require_runnable=False)


def test_one_registry_answers_every_architecture_question():
    """engine/config/architectures.py is the only list: the runnable names, the model specs, latent attention and MXFP4
    experts are all views of it."""
    from moelink.engine.config import architectures as reg
    from moelink.engine.config.hf_readers import MLA_ARCHITECTURES
    from moelink.engine.config.quantization import MXFP4_ARCHITECTURES

    assert SUPPORTED_ARCHITECTURES == reg.SUPPORTED_ARCHITECTURES == tuple(ARCHITECTURES)
    assert all(ARCHITECTURES[n] is reg.REGISTRY[n].spec for n in ARCHITECTURES)
    # The latent-attention architectures are a view of the registry (the next line), whichever families add them.
    assert {"DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV32ForCausalLM",
            "GlmMoeDsaForCausalLM"} <= set(MLA_ARCHITECTURES)
    assert all((n in MLA_ARCHITECTURES) == (s.attention == "mla") for n, s in ARCHITECTURES.items())
    assert MXFP4_ARCHITECTURES == ("GptOssForCausalLM", "KimiK3ForCausalLM", "KimiK3LinearForCausalLM")
