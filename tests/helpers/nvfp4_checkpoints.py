"""Tiny Qwen3-MoE and DeepSeek-V3 checkpoints with NVFP4 experts in ModelOpt's published layout (kernels/nvfp4.py),
for tests/engine/test_nvfp4_checkpoint.py.

transformers builds and saves each model (float64); `nvfp4_checkpoint` then rewrites every routed expert's
gate_proj / up_proj / down_proj as ModelOpt exports them (`weight` uint8 [N, K/2], `weight_scale` float8_e4m3fn
[N, K/16], `weight_scale_2` and `input_scale` float32 scalars; gate and up quantized apart, so their global scales
differ) and writes the quantization the way config.json or hf_quant_config.json says it; `dequantized_copy` is the
float64 checkpoint holding exactly the weights the NVFP4 one means (the oracle's). Hidden and expert sizes are
multiples of 16 (one e4m3 scale per 16 values).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

VOCAB, MAX_POS = 400, 512

NVFP4_TINY: dict[str, tuple[str, str, dict]] = {
    "qwen3": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=32, intermediate_size=48, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=True)),
    "dsv3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=2.5)),
}
# ModelOpt's exclusions as its FP4 releases write them: the attention, the router and lm_head stay bf16.
IGNORE = ["lm_head", "model.layers.*.self_attn*", "model.layers.*.mlp.gate"]
_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
# scope "all": every projection ModelOpt's default NVFP4 recipe quantizes (not the router, embeddings or lm_head)
_LINEAR = re.compile(r"\.(q|k|v|o|q_a|q_b|kv_b|gate|up|down)_proj\.weight$|\.kv_a_proj_with_mqa\.weight$")


def save_tiny(out: Path, name: str, seed: int = 0) -> str:
    """transformers' own model on NVFP4_TINY[name] (random norms and correction bias), saved float64 with the
    tiny tokenizer."""
    import transformers

    from moelink.engine.tools.tiny_corpus import train_tiny_tokenizer, write_tokenizer_configs

    config_cls, model_cls, fields = NVFP4_TINY[name]
    cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, max_position_embeddings=MAX_POS, initializer_range=0.1,
                                             **fields)
    cfg.architectures = [model_cls]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g, dtype=torch.float64) * 0.1)
            bias = getattr(mod, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=g, dtype=bias.dtype) * 0.05)
    out = Path(out)
    model.save_pretrained(out)
    tok = train_tiny_tokenizer(VOCAB)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_configs(out, tok, MAX_POS)
    return str(out)


def _rewrite(src: Path, out: Path, tensors_fn, config_fn) -> str:
    """Copy checkpoint `src` to `out` with each safetensors file's tensors mapped by tensors_fn and config.json by
    config_fn (the index's weight map follows the tensors)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    where: dict[str, str] = {}
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = tensors_fn(load_file(str(f)))
            save_file(tensors, str(out / f.name), metadata={"format": "pt"})
            where.update({k: f.name for k in tensors})
        elif f.is_file() and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    if (src / "model.safetensors.index.json").is_file():
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": where}))
    (out / "config.json").write_text(json.dumps(config_fn(json.loads((src / "config.json").read_text()))))
    return str(out)


def nvfp4_checkpoint(src: str, out: Path, hf_quant_file: bool = False, scope: str = "experts") -> str:
    """`src` with its routed experts (scope "experts"), or every projection (scope "all": attention, dense and
    shared MLPs too, as ModelOpt's default recipe does), in ModelOpt's NVFP4 layout; the quantization in
    config.json's quantization_config (`ignore`), or with `hf_quant_file` in hf_quant_config.json
    (`exclude_modules`), as ModelOpt's older exports have it."""
    pattern = _EXPERT if scope == "experts" else _LINEAR
    ignore = IGNORE if scope == "experts" else ["lm_head", "model.layers.*.mlp.gate"]
    from moelink.kernels.nvfp4 import nvfp4_quantize

    def tensors(ts: dict) -> dict:
        new = {}
        for name, t in ts.items():
            if not pattern.search(name):
                new[name] = t
                continue
            q, s, g = nvfp4_quantize(t)
            base = name[: -len("weight")]
            new.update({base + "weight": q, base + "weight_scale": s, base + "weight_scale_2": g.reshape(()),
                        base + "input_scale": torch.tensor(0.5, dtype=torch.float32)})
        return new

    def config(c: dict) -> dict:
        if not hf_quant_file:
            c["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                                        "kv_cache_quant_algo": None, "ignore": ignore}
        return c

    path = _rewrite(Path(src), Path(out), tensors, config)
    if hf_quant_file:
        (Path(out) / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.29.0"},
            "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                             "exclude_modules": ignore}}))
    return path


def dequantized_copy(nvfp4_dir: str, out: Path) -> str:
    """The NVFP4 checkpoint with each NVFP4 weight dequantized to float64 (e2m1 x weight_scale x weight_scale_2)
    and its scales dropped; no quantization. transformers loads it as a float model holding exactly the NVFP4
    model's weights."""
    from moelink.kernels.nvfp4 import nvfp4_dequantize

    def tensors(ts: dict) -> dict:
        new = {}
        for name, t in ts.items():
            if name.endswith(("weight_scale", "weight_scale_2", "input_scale")):
                continue
            base = name[: -len("weight")]
            if base + "weight_scale_2" in ts:
                t = nvfp4_dequantize(t, ts[base + "weight_scale"], ts[base + "weight_scale_2"], torch.float64)
            new[name] = t
        return new

    def config(c: dict) -> dict:
        c.pop("quantization_config", None)
        return c

    return _rewrite(Path(nvfp4_dir), Path(out), tensors, config)
