"""quantization_config: what runs (fp8 blocks, dynamic activations, modules_to_not_convert / ignored_layers),
and one clear error naming the field for everything else; the loader's dtype and shape errors name the
tensor; the quantize-fp8 command."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelink.engine import LLM, EngineArgs
from moelink.engine.api.cli import main
from moelink.engine.config.model import ModelConfig
from moelink.engine.rank.loader import load_model
from moelink.engine.models.linear import linear_method
from moelink.engine.config.quantization import Fp8Config, read_quantization, resolve_quantization
from moelink.kernels.fp8 import FP8_DTYPE, block_dequantize
from moelink.kernels.ops import ReferenceKernels
from moelink.moe.expert_weights import scale_index

from tests.helpers.fp8_checkpoints import BLOCK

CPU = torch.device("cpu")


def _with_config(src: str, out: Path, weights: bool = False, **changes) -> str:
    """A copy of checkpoint `src` (config.json only, or everything) with config.json fields replaced."""
    out.mkdir()
    for f in Path(src).iterdir():
        if weights or f.name != "config.json" and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    cfg = json.loads((Path(src) / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


# (awq, gptq and compressed-tensors are read since issue 44, as INT4 W4A16: tests/engine/test_int4_checkpoint.py)
@pytest.mark.parametrize("method", ["bitsandbytes", "hqq", "eetq"])
def test_other_quant_methods_are_refused_naming_the_field(fp8_tiny, tmp_path, method):
    src, _, _ = fp8_tiny("qwen3_fp8")
    path = _with_config(src, tmp_path / "q", quantization_config={"quant_method": method, "bits": 4})
    with pytest.raises(ValueError) as e:
        ModelConfig.from_pretrained(path)
    msg = str(e.value)
    assert "quantization_config.quant_method" in msg and repr(method) in msg and "'fp8'" in msg and "'mxfp4'" in msg


@pytest.mark.parametrize("quant,field", [
    (dict(weight_block_size=[128]), "weight_block_size"),
    (dict(weight_block_size=[0, 128]), "weight_block_size"),
    (dict(weight_block_size="128x128"), "weight_block_size"),
    (dict(weight_block_size=None), "weight_block_size"),
    (dict(activation_scheme="static"), "activation_scheme"),
    (dict(fmt="e5m2"), "fmt"),
])
def test_fp8_fields_are_checked(quant, field):
    q = dict({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
             **quant)
    q = {k: v for k, v in q.items() if v is not None}
    with pytest.raises(ValueError, match=f"quantization_config.{field}"):
        read_quantization(q)


def test_fp8_config_reads_published_fields():
    q = read_quantization({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": [128, 64], "modules_to_not_convert": ["lm_head"],
                           "ignored_layers": ["model.layers.0.self_attn"]})
    assert q == Fp8Config((128, 64), "dynamic", ("lm_head", "model.layers.0.self_attn"))
    assert not q.is_quantized("model.layers.0.self_attn.q_proj") and q.is_quantized("model.layers.1.self_attn.q_proj")
    assert not q.is_quantized("lm_head") and q.is_quantized("model.layers.10.self_attn.q_proj")
    assert read_quantization(None) is None and read_quantization({}) is None


def test_requested_quantization_is_checked():
    fp8 = Fp8Config((16, 16))
    assert resolve_quantization(None, "fp8") == Fp8Config(online=True)
    assert resolve_quantization(fp8, "fp8") is fp8 and resolve_quantization(fp8, None) is fp8
    with pytest.raises(ValueError, match="quantization='int8' is invalid"):
        resolve_quantization(None, "int8")
    with pytest.raises(ValueError, match="fp8_block_size"):
        resolve_quantization(None, None, (16, 16))
    with pytest.raises(ValueError, match="fp8_block_size"):
        resolve_quantization(fp8, "fp8", (128, 128))
    with pytest.raises(ValueError, match="fp8_block_size"):
        resolve_quantization(None, "fp8", (0, 16))
    with pytest.raises(ValueError, match="quantization='awq' is invalid"):
        EngineArgs(model="x", quantization="awq")


def test_the_tool_quantizes_what_deepseek_quantizes():
    from moelink.engine.tools.quantize_fp8 import is_quantized_name

    yes = ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.kv_a_proj_with_mqa.weight",
           "model.layers.3.self_attn.q_b_proj.weight", "model.layers.3.self_attn.kv_b_proj.weight",
           "model.layers.0.mlp.gate_proj.weight", "model.layers.5.mlp.shared_experts.down_proj.weight",
           "model.layers.5.mlp.experts.17.up_proj.weight", "model.layers.1.block_sparse_moe.experts.0.w3.weight",
           "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
    no = ["model.layers.1.mlp.gate.weight", "model.layers.1.block_sparse_moe.gate.weight", "lm_head.weight",
          "model.embed_tokens.weight", "model.layers.0.self_attn.q_a_layernorm.weight", "model.norm.weight",
          "model.layers.0.self_attn.o_proj.bias", "model.layers.1.mlp.gate.e_score_correction_bias"]
    assert all(map(is_quantized_name, yes)) and not any(map(is_quantized_name, no))


def test_stacked_pieces_must_start_on_a_block():
    assert scale_index((slice(64, 96),), 16, "x") == (slice(4, 6),)
    assert scale_index((3, slice(16, 40),), 16, "x") == (3, slice(1, 3))  # a ragged last piece
    with pytest.raises(ValueError, match="not a multiple of weight_block_size"):
        scale_index((slice(24, 48),), 16, "model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        linear_method(Fp8Config(modules_to_not_convert=("q_proj",)), "a.q_proj", "a.k_proj", "a.v_proj")


def test_expert_intermediate_need_not_be_whole_blocks(fp8_tiny):
    """Experts 16 wide in 32-row blocks (issue 27 used to refuse them): up starts at row 32, a block of its own,
    rows 16..31 zeros; dense pieces the same (test_fp8_ragged_widths.py runs such models end to end)."""
    src, _, _ = fp8_tiny("qwen3_fp8")
    cfg = ModelConfig.from_pretrained(src, "float32", quantization="fp8", fp8_block_size=(32, 16))
    moe = load_model(cfg, ReferenceKernels(), CPU).layers[0].moe
    assert tuple(moe.w13_EFD.shape) == (6, 48, 40) and tuple(moe.w13_scale_inv_EFD.shape) == (6, 2, 3)
    assert (moe.w13_EFD[:, 16:32].view(torch.uint8) == 0).all()


def test_modules_to_not_convert_stay_float(fp8_tiny, tmp_path, caplog):
    """An FP8 checkpoint whose o_proj weights are published float (listed in modules_to_not_convert) loads
    them float and runs; everything else stays FP8. Start-up logs the rank's weights per format and its KV."""
    _, dst, _ = fp8_tiny("dsv3_fp8")
    cfg = json.loads((Path(dst) / "config.json").read_text())
    path = _with_config(dst, tmp_path / "skip", weights=True,
                        quantization_config=dict(cfg["quantization_config"], modules_to_not_convert=["o_proj"]))
    for f in Path(path).glob("*.safetensors"):
        t = load_file(str(f))
        for name in [n for n in t if n.endswith("o_proj.weight")]:
            t[name] = block_dequantize(t[name], t.pop(name + "_scale_inv"), BLOCK, torch.float64)
        save_file(t, str(f), metadata={"format": "pt"})
    model = load_model(ModelConfig.from_pretrained(path, "float64"), ReferenceKernels(), CPU)
    attn = model.layers[1].self_attn
    assert attn.o_proj.weight.dtype == torch.float64 and attn.o_proj.weight_scale_inv is None
    assert attn.q_b_proj.weight.dtype == FP8_DTYPE and model.layers[1].moe.w13_EFD.dtype == FP8_DTYPE
    with caplog.at_level("INFO", logger="moelink.engine.rank.model_runner"):
        llm = LLM(path, dtype="float64", num_kv_blocks=16, block_size=8)
    assert len(llm.generate([[1, 2, 3]], use_tqdm=False)[0].outputs[0].token_ids) > 0
    line = next(r.getMessage() for r in caplog.records if "rank memory" in r.getMessage())
    assert "fp8 " in line and "float " in line and "16 blocks x 8 = 128 tokens" in line, line


def test_loader_errors_name_the_tensor(fp8_tiny, tmp_path):
    _, dst, _ = fp8_tiny("qwen3_fp8")
    # FP8 tensors without quantization_config: refused, not cast into wrong numbers.
    plain = _with_config(dst, tmp_path / "plain", weights=True, quantization_config=None)
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model\.layers\.0\.self_attn\.[qkvo]_proj\.weight' is "
                                         r"torch\.float8_e4m3fn"):
        load_model(ModelConfig.from_pretrained(plain, "float32"), ReferenceKernels(), CPU)
    # A scale of the wrong shape.
    bad = _with_config(dst, tmp_path / "bad", weights=True)
    f = next(Path(bad).glob("*.safetensors"))
    t = load_file(str(f))
    t["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.o_proj\.weight_scale_inv' has shape \(1, 1\)"):
        load_model(ModelConfig.from_pretrained(bad, "float32"), ReferenceKernels(), CPU)
    # Online quantization of an already-FP8 checkpoint's tensors cannot happen: its config says fp8 already.
    assert ModelConfig.from_pretrained(dst, quantization="fp8").quantization.online is False


def test_quantize_fp8_command(fp8_tiny, tmp_path, capsys):
    src, dst, _ = fp8_tiny("qwen3_fp8")
    assert main(["quantize-fp8", src, str(tmp_path / "out"), "--block", "16", "16"]) == 0
    assert "wrote the FP8" in capsys.readouterr().out
    a, b = load_file(str(next(Path(dst).glob("*.safetensors")))), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == FP8_DTYPE else a[k],
                                                    b[k].view(torch.uint8) if b[k].dtype == FP8_DTYPE else b[k]) for k in a)
    assert main(["quantize-fp8", src, str(tmp_path / "bad"), "--block", "0", "16"]) == 2
    assert "weight_block_size" in capsys.readouterr().err
    assert main(["quantize-fp8", dst, str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_quantize_fp8_keeps_shards_and_index(fp8_tiny, tmp_path):
    """A sharded float checkpoint (two files + model.safetensors.index.json) converts shard by shard: the same
    file names, the index naming every scale, and the model it loads equals the one-file conversion."""
    src, dst, _ = fp8_tiny("qwen3_fp8")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    tensors = load_file(str(Path(src) / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(sharded / fname), metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}))
    for f in Path(src).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, sharded / f.name)
    out = tmp_path / "fp8"
    assert main(["quantize-fp8", str(sharded), str(out), "--block", "16", "16"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.0.self_attn.q_proj.weight_scale_inv"] == index["model.layers.0.self_attn.q_proj.weight"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(shards)
    a = load_model(ModelConfig.from_pretrained(str(out), "float32"), ReferenceKernels(), CPU).state_dict()
    b = load_model(ModelConfig.from_pretrained(dst, "float32"), ReferenceKernels(), CPU).state_dict()
    assert all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == FP8_DTYPE else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == FP8_DTYPE else b[k]) for k in a)
