"""`load_format="dummy"` (vLLM's): every architecture the tiny checkpoints cover runs from a directory holding
config.json alone, with random weights made on the device and no safetensors file opened.

Oracles: the tensors the dummy checkpoint makes have the names, shapes and quantized dtypes of real checkpoints
of the same config.json (written by transformers, `moelink make-tiny-model`, `quantize-fp8`, `quantize-mxfp4`);
each rank of an expert-parallel model holds exactly the single rank's rows of its experts; two engines give the
same tokens. tests/ep/test_ep_dummy.py runs EP 2 on Ray against one rank."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from moelink.comm.backends import make_all_to_all
from moelink.engine import LLM, SamplingParams
from moelink.engine.api.cli_args import engine_args_from
from moelink.engine.config.model import ModelConfig
from moelink.engine.rank.dummy_weights import DummyCheckpoint, WEIGHT_RANGE, checkpoint_shape
from moelink.engine.config.engine_args import EngineArgs
from moelink.engine.rank.loader import checkpoint_index, load_model
from moelink.engine.tools.mxfp4_checkpoint import MODULES_NOT_CONVERTED
from moelink.kernels.fp8 import FP8_DTYPE
from moelink.kernels.ops import ReferenceKernels
from moelink.moe.layer import ExpertParallel
from moelink.moe.placement import ExpertPlacement

from tests.helpers.dsv4_checkpoint import dsv4_config
from tests.helpers.fp8_checkpoints import BLOCK, FP8_TINY
from tests.helpers.gpt_oss_checkpoints import gpt_oss_config
from tests.helpers.hf_checkpoints import hf_config

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

CPU = torch.device("cpu")
FP8_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
MXFP4_QUANT = {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_NOT_CONVERTED}
# DeepSeek-V4 as published: FP8 linears with ue8m0 block scales (16 x 16 here), FP4 experts (config.json's expert_dtype)
DSV4_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "scale_fmt": "ue8m0",
              "weight_block_size": list(BLOCK)}


def _write_config(out: Path, cfg, quant: dict | None = None) -> str:
    """`cfg` (a transformers config, or a config.json to copy) as the directory's only file."""
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(cfg, (str, Path)):
        shutil.copy(Path(cfg) / "config.json", out / "config.json")
    else:
        cfg.save_pretrained(out)
    if quant is not None:
        raw = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**raw, "quantization_config": quant}))
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    return str(out)


def _fp8_config(name: str):
    import transformers

    config_cls, model_cls, fields = FP8_TINY[name]
    cfg = getattr(transformers, config_cls)(vocab_size=400, max_position_embeddings=512, **fields)
    cfg.architectures = [model_cls]
    return cfg


# case -> (config source, quantization_config, EngineArgs extras). Every architecture of the tiny checkpoints,
# gpt-oss float and MXFP4, FP8 checkpoints (GQA and MLA with its interleaved rope), online FP8, and DeepSeek-V4 float
# and as published (its hash-routed layers' token-id table: random distinct expert ids a row).
CASES = {
    "qwen3_moe": (lambda tm: tm("qwen3_e6k3"), None, {}),
    "qwen3_dense_layer": (lambda tm: tm("qwen3_e8k2_dense1"), None, {}),
    "mixtral": (lambda tm: tm("mixtral_e5k3"), None, {}),
    "deepseek_v3": (lambda tm: hf_config("dsv3_lora"), None, {}),
    "deepseek_v3_yarn_bias": (lambda tm: hf_config("dsv3_yarn"), None, {}),
    "deepseek_v2": (lambda tm: hf_config("dsv2_lite"), None, {}),
    "glm4_moe": (lambda tm: hf_config("glm_bias"), None, {}),
    "gpt_oss": (lambda tm: gpt_oss_config(), None, {}),
    "gpt_oss_mxfp4": (lambda tm: gpt_oss_config(intermediate_size=32), MXFP4_QUANT, {}),
    "qwen3_fp8": (lambda tm: _fp8_config("qwen3_fp8"), FP8_QUANT, {}),
    "deepseek_v3_fp8": (lambda tm: _fp8_config("dsv3_fp8"), FP8_QUANT, {}),
    "qwen3_online_fp8": (lambda tm: tm("qwen3_e6k3"), None, {"quantization": "fp8", "fp8_block_size": [16, 16]}),
    "deepseek_v4": (lambda tm: dsv4_config(), None, {}),
    "deepseek_v4_published": (lambda tm: dsv4_config(moe_intermediate_size=32, expert_dtype="fp4"), DSV4_QUANT, {}),
}


@pytest.fixture
def config_dir(tiny_model, tmp_path):
    def make(case: str) -> tuple[str, dict]:
        source, quant, extra = CASES[case]
        return _write_config(tmp_path / case, source(tiny_model), quant), extra

    return make


@pytest.fixture
def no_safetensors(monkeypatch):
    """Any safetensors file opened fails the test."""
    import safetensors
    # Imported before the patch: these bind `safe_open` at their own import, and a first import under the patch
    # would keep the refusing stand-in for every later test of this process (transformers' from_pretrained).
    import safetensors.torch  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    import moelink.engine.rank.loader as loader

    def refuse(*args, **kwargs):
        raise AssertionError(f"a safetensors file was opened under load_format='dummy': {args}")

    monkeypatch.setattr(loader, "safe_open", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)


def _dummy_llm(path: str, **extra) -> LLM:
    return LLM(model=path, load_format="dummy", dtype="float32", device="cpu", num_kv_blocks=64, block_size=16,
               max_num_seqs=4, **extra)


IDS = [[5, 17, 3, 250, 9, 42], [7, 7, 100]]
GREEDY = SamplingParams(max_tokens=4, temperature=0, detokenize=False, ignore_eos=True, logprobs=3)


def _run(llm: LLM) -> list[tuple[list[int], list[float]]]:
    outs = llm.generate(IDS, GREEDY, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [v.logprob for lp in o.outputs[0].logprobs for v in lp.values()])
            for o in outs]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_generates_from_config_json_alone(config_dir, no_safetensors, case):
    path, extra = config_dir(case)
    vocab = ModelConfig.from_pretrained(path).vocab_size
    runs = []
    for _ in range(2):  # two engines, each building its own random weights
        with _dummy_llm(path, **extra) as llm:
            runs.append(_run(llm))
    for ids, logprobs in runs[0]:
        assert len(ids) == GREEDY.max_tokens and all(0 <= t < vocab for t in ids)
        assert logprobs and all(math.isfinite(v) and v <= 0 for v in logprobs)
    assert runs[0] == runs[1]
    assert runs[0][0][0] != runs[0][1][0]  # the prompts lead to different tokens: the layers count


@pytest.mark.parametrize("case", ["qwen3_moe", "deepseek_v3_fp8", "gpt_oss", "gpt_oss_mxfp4", "qwen3_online_fp8",
                                  "deepseek_v4"])
def test_weights_are_random_in_the_plans_shapes(config_dir, no_safetensors, case):
    path, extra = config_dir(case)
    cfg = ModelConfig.from_pretrained(path, "float32", quantization=extra.get("quantization"),
                                      fp8_block_size=extra.get("fp8_block_size"))
    model = load_model(cfg, ReferenceKernels(), CPU, load_format="dummy")
    for name, (dest, idx, *_) in model.weight_plan(None).items():
        dest = getattr(dest, "weight", dest)  # online FP8: the quantized weight
        t = (dest[idx] if idx else dest).detach()
        if t.dtype == FP8_DTYPE:
            t = t.float()
        if name.removesuffix(".weight").endswith("norm"):
            assert torch.equal(t, torch.ones_like(t)), name
        elif "kv_b_proj" not in name:  # MLA's kv_b_proj is dequantized after loading (float)
            assert t.double().abs().sum() > 0 and torch.isfinite(t.double()).all(), name
    # Float weights stay in their range; FP8 ones dequantize into it; MXFP4 scales are those of that range.
    assert model.embed_tokens.abs().max() <= WEIGHT_RANGE


_ST_DTYPES = {"F8_E4M3": FP8_DTYPE, "U8": torch.uint8, "F32": torch.float32, "F64": torch.float64,
              "BF16": torch.bfloat16, "F16": torch.float16}


def _real_specs(path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from safetensors import safe_open

    out = {}
    for name, f in checkpoint_index(path).items():
        with safe_open(str(f), framework="pt") as st:
            t = st.get_slice(name)
            out[name] = (tuple(t.get_shape()), _ST_DTYPES[t.get_dtype()])
    return out


@pytest.fixture(scope="module")
def gpt_oss_checkpoints(tmp_path_factory):
    from moelink.engine.tools.mxfp4_checkpoint import quantize_mxfp4_checkpoint
    from tests.helpers.gpt_oss_checkpoints import save_gpt_oss

    root = tmp_path_factory.mktemp("gpt_oss_dummy")
    src = save_gpt_oss(root / "float", intermediate_size=32)
    return {"float": src, "mxfp4": str(quantize_mxfp4_checkpoint(src, root / "mxfp4"))}


@pytest.mark.parametrize("which", ["qwen3", "mixtral", "dsv3", "dsv3_fp8", "gpt_oss", "gpt_oss_mxfp4"])
def test_dummy_checkpoint_has_the_real_checkpoints_tensors(tiny_model, hf_tiny_model, fp8_tiny, gpt_oss_checkpoints,
                                                           which):
    path = {"qwen3": lambda: tiny_model("qwen3_e6k3"), "mixtral": lambda: tiny_model("mixtral_e5k3"),
            "dsv3": lambda: hf_tiny_model("dsv3_lora"), "dsv3_fp8": lambda: fp8_tiny("dsv3_fp8")[1],
            "gpt_oss": lambda: gpt_oss_checkpoints["float"],
            "gpt_oss_mxfp4": lambda: gpt_oss_checkpoints["mxfp4"]}[which]()
    real = _real_specs(path)
    dummy = DummyCheckpoint.for_model(ModelConfig.from_pretrained(path, "float32"), CPU).specs
    assert sorted(dummy) == sorted(real)
    for name, (shape, dtype) in real.items():
        assert dummy[name].shape == shape, name
        if dtype in (FP8_DTYPE, torch.uint8) or name.endswith("_scale_inv"):
            assert dummy[name].dtype == dtype, name


def test_checkpoint_shape_reads_the_index_back():
    # gpt-oss's gate_up_proj [E, D, 2I] read as [E, 2I, D] (transposed, gate/up de-interleaved).
    e, d, f = torch.arange(5), torch.arange(32), torch.tensor([0, 2, 4, 1, 3, 5])
    assert checkpoint_shape((5, 6, 32), (e[:, None, None], d[None, None, :], f[None, :, None])) == (5, 32, 6)
    # MXFP4 blocks [E, 2I, S, 16] read through (all experts, row order): the same shape.
    assert checkpoint_shape((5, 6, 1, 16), (slice(None), f)) == (5, 6, 1, 16)
    assert checkpoint_shape((12, 7), (torch.tensor([1, 0] + list(range(2, 12))),)) == (12, 7)


@pytest.mark.parametrize("case,ep", [("qwen3_moe", 3), ("gpt_oss", 2), ("gpt_oss_mxfp4", 3), ("deepseek_v3_fp8", 2),
                                     ("qwen3_online_fp8", 2), ("deepseek_v4", 2), ("deepseek_v4_published", 3)])
def test_each_rank_holds_the_single_ranks_experts(config_dir, no_safetensors, case, ep):
    path, extra = config_dir(case)
    cfg = ModelConfig.from_pretrained(path, "float32", quantization=extra.get("quantization"),
                                      fp8_block_size=extra.get("fp8_block_size"))
    whole = load_model(cfg, ReferenceKernels(), CPU, load_format="dummy")
    placement = ExpertPlacement(num_experts=cfg.num_experts, ep_size=ep)
    for rank in range(ep):
        part = ExpertParallel(rank, ep, placement, make_all_to_all("none", None, 0, 1, "cpu"),
                              placement.to_tensors("cpu"))
        model = load_model(cfg, ReferenceKernels(), CPU, part, load_format="dummy")
        local = torch.tensor(placement.experts_on_rank(rank))
        compared = set()
        for i in cfg.sparse_layers:
            mine, all_ = model.layers[i].moe, whole.layers[i].moe
            for pname, p in mine.named_parameters(recurse=False):
                if p.dim() and p.shape[0] == len(local) and pname not in ("gate_GD", "gate_bias_G"):
                    ref = getattr(all_, pname)[local]
                    assert torch.equal(p.view(torch.uint8) if p.dtype == FP8_DTYPE else p,
                                       ref.view(torch.uint8) if ref.dtype == FP8_DTYPE else ref), (rank, i, pname)
                    compared.add(pname)
        assert {"w13_EFD", "w2_EDI"} <= compared or {"w13_blocks_EFSQ", "w13_scales_EFS", "w2_blocks_EDSQ"} <= compared
        assert case != "gpt_oss_mxfp4" or "b13_EF" in compared
        assert "fp8" not in case or {"w13_scale_inv_EFD", "w2_scale_inv_EDI"} <= compared
        # Everything else (attention, router, embeddings) is the same tensor on every rank.
        torch.testing.assert_close(model.embed_tokens, whole.embed_tokens, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["float", "published"])
def test_dsv4_dummy_checkpoint_has_the_real_checkpoints_tensors(tmp_path, fmt):
    """DeepSeek-V4 from config.json alone (refused before issue 54): the tensors DummyCheckpoint makes are those of the
    checkpoint `moelink make-tiny-model --arch deepseek_v4 [--format published]` writes, name for name (DeepSeek's
    published names mapped back to transformers'), shape for shape, in the loader's dtypes (FP4 experts and their
    E8M0 scales as bytes, the FP8 linears' ue8m0 scales as the float32 they are read into); the hash-routed layers'
    token-id table holds top_k distinct valid expert ids per token."""
    from safetensors import safe_open

    from moelink.engine.models.deepseek_v4.blocks import published_name
    from moelink.engine.tools.tiny_model import make_tiny_model

    path = make_tiny_model(tmp_path / "v4", "deepseek_v4", format=fmt)
    real = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as st:
        for name in st.keys():
            real[name] = (tuple(st.get_slice(name).get_shape()), st.get_slice(name).get_dtype())
    cfg = ModelConfig.from_pretrained(str(path), "float32")
    checkpoint = DummyCheckpoint.for_model(cfg, CPU)
    dummy = {published_name(n) if fmt == "published" else n: s for n, s in checkpoint.specs.items()}
    assert sorted(dummy) == sorted(real)
    held = {"F32": {torch.float32}, "F8_E4M3": {FP8_DTYPE}, "I8": {torch.uint8}, "F8_E8M0": {torch.uint8, torch.float32},
            "I64": {torch.long}}
    for name, (shape, dtype) in real.items():
        assert dummy[name].shape == shape and dummy[name].dtype in held[dtype], (name, dummy[name], shape, dtype)
    tables = [n for n in checkpoint.specs if n.endswith("gate.tid2eid")]
    assert len(tables) == len(cfg.hash_layers) == 2
    for name in tables:
        ids = checkpoint.get_tensor(name)
        assert ids.shape == (cfg.vocab_size, cfg.top_k) and 0 <= int(ids.min()) and int(ids.max()) < cfg.num_experts
        assert (ids.sort(dim=1).values.diff(dim=1) > 0).all(), "a token's experts are distinct"


def test_dsv4_mtp_drafter_loads_dummy_weights(tmp_path, no_safetensors):
    """V4 with an MTP layer (num_nextn_predict_layers 1) from config.json alone: the drafter's `mtp.0.*` are dummy
    too, and speculative decoding keeps the greedy tokens of the run without it."""
    path = _write_config(tmp_path / "v4_mtp", dsv4_config(num_nextn_predict_layers=1))
    with _dummy_llm(path) as llm:
        plain = _run(llm)
    with _dummy_llm(path, speculative_config={"method": "mtp", "num_speculative_tokens": 2}) as llm:
        spec = _run(llm)
    assert [ids for ids, _ in spec] == [ids for ids, _ in plain]


def test_a_checkpoint_with_weights_is_not_read(tiny_model, no_safetensors, caplog):
    path = tiny_model("qwen3_e6k3")  # safetensors and tokenizer present: the weights are ignored, the tokenizer used
    with caplog.at_level("WARNING"), _dummy_llm(path) as llm:
        out = llm.generate("hello", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3 and isinstance(out[0].outputs[0].text, str)
    assert any("weights are RANDOM" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_deep_bf16_model_stays_finite(tmp_path, no_safetensors):
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=512, hidden_size=128, num_hidden_layers=48, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=32, moe_intermediate_size=64, num_experts=8,
                                      num_experts_per_tok=2, max_position_embeddings=256)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    path = _write_config(tmp_path / "deep", cfg)
    with LLM(model=path, load_format="dummy", dtype="bfloat16", device="cpu", num_kv_blocks=16) as llm:
        (ids, logprobs), = [_run(llm)[0]]
    assert all(math.isfinite(v) for v in logprobs) and len(set(ids)) >= 1


def test_bad_load_format_is_refused(tiny_model):
    with pytest.raises(ValueError) as e:
        EngineArgs(model=tiny_model("qwen3_e6k3"), load_format="pt")
    assert str(e.value) == "load_format='pt' is invalid: choose from 'auto', 'safetensors', 'dummy'."


def test_cli_flag_on_generate_and_serve():
    from moelink.engine.api.cli import build_parser

    for cmd in ("generate", "serve"):
        extra = ["--prompt", "x"] if cmd == "generate" else []
        ns = build_parser().parse_args([cmd, "some/model", "--load-format", "dummy", *extra])
        assert engine_args_from(ns).load_format == "dummy"
        assert engine_args_from(build_parser().parse_args([cmd, "some/model", *extra])).load_format == "auto"
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "some/model", "--load-format", "pt", *extra])


def test_without_a_tokenizer_only_token_ids_run(config_dir):
    path, _ = config_dir("qwen3_moe")
    with _dummy_llm(path) as llm:
        for prompt, params, what in [
                ("hello", SamplingParams(max_tokens=2, detokenize=False), "prompt is text"),
                ([1, 2, 3], SamplingParams(max_tokens=2), "SamplingParams.detokenize=True (the default) asks for text")]:
            with pytest.raises(ValueError) as e:
                llm.generate(prompt, params, use_tqdm=False)
            assert str(e.value).startswith(f"{what}, but model={path!r} has no tokenizer (no tokenizer.json")
        assert llm.engine.stats().num_running == 0  # nothing was admitted
        out = llm.generate([1, 2, 3], SamplingParams(max_tokens=2, detokenize=False, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 2 and out[0].outputs[0].text == ""


def test_generate_cli_warns_and_refuses_text_without_a_tokenizer(config_dir, capsys):
    from moelink.engine.api.cli import main

    path, _ = config_dir("qwen3_moe")
    assert main(["generate", path, "--load-format", "dummy", "--device", "cpu", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "moelink: WARNING: --load-format dummy: the weights are RANDOM" in err
    assert "moelink: error: a text prompt was given, but model=" in err and "has no tokenizer" in err


def test_a_repo_id_fetches_config_and_tokenizer_only(monkeypatch, tmp_path, config_dir):
    """Under dummy a Hugging Face id downloads no *.safetensors, and a snapshot with config.json alone will do."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    path, _ = config_dir("qwen3_moe")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen = []

    def fake_snapshot_download(repo_id, *, local_files_only, allow_patterns, cache_dir, revision):
        seen.append(allow_patterns)
        if local_files_only:
            raise errors.LocalEntryNotFoundError("not cached")
        return path

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert EngineArgs(model="org/x", load_format="dummy").model_path() == path
    assert len(seen) == 2 and all("config.json" in p and "tokenizer.json" in p for p in seen)
    assert not any("safetensors" in pattern for p in seen for pattern in p)
