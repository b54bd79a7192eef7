"""`moelink quantize-mxfp4`: a tiny float gpt-oss checkpoint saved by transformers becomes the published MXFP4 layout,
and transformers itself loads the result (its MXFP4 loader dequantizes on CPU) to the weights moelink's reference
dequantizes, with logits equal to the float model's on those weights."""
from __future__ import annotations

import json

import pytest
import torch

from moelink.engine.api.cli import main
from moelink.kernels.mxfp4 import mxfp4_dequantize

E, D, I, L = 4, 64, 96, 2


def _tiny_gpt_oss(path):
    import transformers

    cfg = transformers.GptOssConfig(vocab_size=100, hidden_size=D, intermediate_size=I, num_hidden_layers=L,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=E,
                                    num_experts_per_tok=2, sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention"], initializer_range=0.1)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias") or name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(path)
    return model


def test_quantize_mxfp4_round_trips_through_transformers(tmp_path, capsys):
    import transformers
    from safetensors.torch import load_file

    src, dst = tmp_path / "float", tmp_path / "mxfp4"
    model = _tiny_gpt_oss(src)
    assert main(["quantize-mxfp4", str(src), str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    tensors = {}
    for f in dst.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    p = "model.layers.0.mlp.experts."
    assert tensors[p + "gate_up_proj_blocks"].shape == (E, 2 * I, D // 32, 16)
    assert tensors[p + "gate_up_proj_scales"].shape == (E, 2 * I, D // 32)
    assert tensors[p + "down_proj_blocks"].shape == (E, D, I // 32, 16)
    assert tensors[p + "down_proj_blocks"].dtype == tensors[p + "down_proj_scales"].dtype == torch.uint8
    assert p + "gate_up_proj" not in tensors and p + "gate_up_proj_bias" in tensors
    # transformers' MXFP4 loader (dequantizing on CPU) gives the weights moelink's reference gives ...
    loaded = transformers.GptOssForCausalLM.from_pretrained(
        dst, dtype=torch.float64, quantization_config=transformers.Mxfp4Config(dequantize=True))  # no accelerate here
    loaded.config._experts_implementation = "eager"
    for layer in range(L):
        q = f"model.layers.{layer}.mlp.experts."
        ex = loaded.model.layers[layer].mlp.experts
        want_gu = mxfp4_dequantize(tensors[q + "gate_up_proj_blocks"], tensors[q + "gate_up_proj_scales"], torch.float64)
        want_dn = mxfp4_dequantize(tensors[q + "down_proj_blocks"], tensors[q + "down_proj_scales"], torch.float64)
        assert torch.equal(ex.gate_up_proj.data, want_gu.transpose(1, 2))
        assert torch.equal(ex.down_proj.data, want_dn.transpose(1, 2))
        # ... within MXFP4's error of the float weights (at most one grid step of the group's scale: amax / 3)
        w = model.model.layers[layer].mlp.experts.gate_up_proj.data.double()
        amax = w.transpose(1, 2).abs().reshape(E, 2 * I, D // 32, 32).amax(-1).repeat_interleave(32, -1)
        assert ((ex.gate_up_proj.data - w).abs().transpose(1, 2) <= amax / 3 + 1e-12).all()
    # and the whole model on those weights: the float model with its experts replaced gives the same logits
    float_model = model.double()
    with torch.no_grad():
        for layer in range(L):
            a, b = float_model.model.layers[layer].mlp.experts, loaded.model.layers[layer].mlp.experts
            a.gate_up_proj.copy_(b.gate_up_proj)
            a.down_proj.copy_(b.down_proj)
        ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(loaded(ids).logits, float_model(ids).logits, rtol=1e-10, atol=1e-10)


def test_quantize_mxfp4_refuses_bad_input(tmp_path):
    from moelink.engine.tools.mxfp4_checkpoint import quantize_mxfp4_checkpoint

    with pytest.raises(ValueError, match="config.json"):
        quantize_mxfp4_checkpoint(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(ValueError, match="model_type"):
        quantize_mxfp4_checkpoint(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss",
                                                      "quantization_config": {"quant_method": "mxfp4"}}))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_mxfp4_checkpoint(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        quantize_mxfp4_checkpoint(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="safetensors"):
        quantize_mxfp4_checkpoint(tmp_path, tmp_path / "out2")
