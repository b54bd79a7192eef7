"""Tiny random DeepSeek-V3 / DeepSeek-V2 / GLM-4-MoE checkpoints, built and written by transformers itself.

These families have many more moving parts (MLA's LoRA ranks, rope layouts, groups, shared experts) than
Qwen3-MoE and Mixtral, so instead of writing their files by hand (tiny_model.py does that for those two),
this builds transformers' own model class on a tiny config, gives it moelink's non-degenerate random init and
saves it with `save_pretrained`: the layout and config.json are exactly what transformers writes.

Defaults (hidden 64, 2 layers, 4 heads, 8 routed experts, top-2) are overridden by make_tiny_model's common
arguments and by `extra`, any further config field as transformers names it (`q_lora_rank=None`,
`n_group=4`, `rope_parameters={...}`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional

import torch

from .file_modes import umask_mode

HF_ARCHS = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM"),
}

# Tiny family defaults (transformers' own defaults are the full-size model's). MLA: q LoRA, latent, rope,
# nope and value widths scaled down together; two expert groups, one chosen; one dense layer; one shared expert.
_DEEPSEEK = dict(q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                 n_shared_experts=1, first_k_dense_replace=1)
_FAMILY_DEFAULTS = {
    "deepseek_v3": dict(_DEEPSEEK, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    "deepseek_v2": dict(_DEEPSEEK, q_lora_rank=None, topk_method="group_limited_greedy", n_group=2, topk_group=1),
    "glm4_moe": dict(n_shared_experts=1, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True,
                     routed_scaling_factor=2.5),
}
_ROUTER_GAIN, _LM_HEAD_GAIN, _NORM_NOISE, _BIAS_STD, _CORRECTION_STD = 2.0, 4.0, 0.1, 0.1, 0.05


def build_hf_config(arch: str, common: dict, extra: Optional[Mapping] = None):
    """transformers' config object for a tiny `arch` model: family defaults < `common` < `extra`."""
    import transformers

    config_cls, model_cls = HF_ARCHS[arch]
    fields = dict(_FAMILY_DEFAULTS[arch], **common, **dict(extra or {}))
    try:
        cfg = getattr(transformers, config_cls)(**fields)
    except (TypeError, ValueError) as e:  # strict config classes name the bad field themselves
        raise ValueError(f"make_tiny_model: transformers' {config_cls} refused the config: {e}") from None
    cfg.architectures = [model_cls]
    return cfg


def write_hf_model(out: Path, arch: str, common: dict, extra: Optional[Mapping], *, seed: int,
                   init_std: Optional[float], dtype: torch.dtype, max_shard_size: Optional[int]) -> None:
    """Build, initialise and save the model into `out` (config.json, safetensors; no tokenizer)."""
    import transformers

    cfg = build_hf_config(arch, common, extra)
    torch.manual_seed(seed)  # transformers' own init runs first; every tensor is then drawn below
    model = getattr(transformers, cfg.architectures[0])(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a fixed order: same seed, same bytes
            p.copy_(_draw(name, p, gen, init_std))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # selection-only bias, kept float32 by transformers
                b.copy_(_CORRECTION_STD * torch.randn(b.shape, generator=gen))
    model = model.to(dtype)
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        if old.exists():  # stale shards from an earlier call would leave a mixed checkpoint behind
            old.unlink()
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    umask_mode(out.glob("*.safetensors"))


def _draw(name: str, p: torch.Tensor, gen: torch.Generator, init_std: Optional[float]) -> torch.Tensor:
    """The init of tiny_model.py (fan-in scaled; gains on router and head; noisy norms), by parameter name."""
    if name.endswith("norm.weight"):
        return 1.0 + _NORM_NOISE * torch.randn(p.shape, generator=gen)
    if name.endswith(".bias"):
        return _BIAS_STD * torch.randn(p.shape, generator=gen)
    if "embed_tokens" in name:
        std = 1.0  # followed by RMSNorm, so only direction matters
    elif init_std is not None:
        std = init_std
    else:
        gain = _LM_HEAD_GAIN if name.startswith("lm_head") else _ROUTER_GAIN if name.endswith("mlp.gate.weight") else 1.0
        std = gain / math.sqrt(p.shape[-1])  # fused experts [E, out, in] too: fan-in is the last dim
    return std * torch.randn(p.shape, generator=gen)


def write_generation_config(out: Path, eos_ids: list[int], pad_id: int) -> None:
    # Chat turns end with <|im_end|>, plain text with <|endoftext|>: both stop.
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eos_ids[0], "eos_token_id": eos_ids, "pad_token_id": pad_id}, indent=2) + "\n")
