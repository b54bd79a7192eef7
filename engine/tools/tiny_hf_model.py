"""Tiny random DeepSeek-V3 / DeepSeek-V2 / GLM-4-MoE checkpoints, built and written by transformers itself.

These families have many more moving parts (MLA's LoRA ranks, rope layouts, groups, shared experts) than
Qwen3-MoE and Mixtral, so instead of writing their files by hand (tiny_model.py does that for those two),
this builds transformers' own model class on a tiny config, gives it moelink's non-degenerate random init and
saves it with `save_pretrained`: the layout and config.json are exactly what transformers writes.

Defaults (hidden 64, 2 layers, 4 heads, 8 routed experts, top-2) are overridden by make_tiny_model's common
arguments and by `extra`, any further config field as transformers names it (`q_lora_rank=None`,
`n_group=4`, `rope_parameters={...}`).

MTP layers: transformers' DeepSeek-V3 and GLM-4-MoE classes neither build nor save the next-n prediction layers
that DeepSeek-V3/R1, Kimi K2 and GLM-4.5 publish. `extra={"num_nextn_predict_layers": n}` (or `add_mtp_layers` on
a written checkpoint) appends random ones in the published names and layout (`add_mtp_layers`); an FP8 copy
follows from quantize_fp8.py, which quantizes their decoder layer as a main layer's and leaves eh_proj float.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config.architectures import MTP_ARCHITECTURES, REGISTRY
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
    # No MTP layers unless asked for (extra num_nextn_predict_layers): transformers' default of 1 would make
    # config.json promise layers that transformers never writes.
    "deepseek_v3": dict(_DEEPSEEK, n_group=2, topk_group=1, routed_scaling_factor=2.5, num_nextn_predict_layers=0),
    "deepseek_v2": dict(_DEEPSEEK, q_lora_rank=None, topk_method="group_limited_greedy", n_group=2, topk_group=1),
    "glm4_moe": dict(n_shared_experts=1, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True,
                     routed_scaling_factor=2.5, num_nextn_predict_layers=0),
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
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json", out / _MTP_FILE]:
        if old.exists():  # stale shards from an earlier call would leave a mixed checkpoint behind
            old.unlink()
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    umask_mode(out.glob("*.safetensors"))
    if getattr(cfg, "num_nextn_predict_layers", 0):
        add_mtp_layers(out, cfg.num_nextn_predict_layers, seed=seed, init_std=init_std)


_MTP_FILE = "mtp.safetensors"


def add_mtp_layers(out: Path, num_layers: int = 1, *, seed: int = 0, init_std: Optional[float] = None,
                   embeddings: bool = True) -> None:
    """Append `num_layers` random MTP layers to the DeepSeek-V3 / GLM-4-MoE checkpoint in `out`, as DeepSeek-V3
    publishes them (engine/spec/heads/mtp.py lists the names): `model.layers.{num_hidden_layers + i}.` enorm, hnorm,
    eh_proj [D, 2D], shared_head.norm, a decoder layer laid out as the last main layer (which must be a MoE
    layer: its experts per expert or fused, as that layer is), and with `embeddings` MTP copies of the main
    embedding and head (`embed_tokens`, `shared_head.head`; DeepSeek-V3 ships them), else none (the drafter
    shares the main model's). Written to mtp.safetensors, listed in model.safetensors.index.json (made if the
    checkpoint had one file); config.json gets num_nextn_predict_layers."""
    out = Path(out)
    config = json.loads((out / "config.json").read_text())
    arch = (config.get("architectures") or [None])[0]
    nextn = [a for a in MTP_ARCHITECTURES if REGISTRY[a].mtp_layout == "nextn"]
    if arch not in nextn:  # Qwen3-Next / Qwen3.5 store theirs as mtp.*: engine/tools/qwen_mtp_checkpoint.py
        raise ValueError(f"add_mtp_layers: architecture {arch!r} has no MTP layers in DeepSeek-V3's layout (only "
                         f"{', '.join(nextn)}; Qwen3-Next / Qwen3.5: qwen_mtp_checkpoint.add_qwen_mtp_module).")
    L, first_dense = int(config["num_hidden_layers"]), int(config.get("first_k_dense_replace") or 0)
    if not isinstance(num_layers, int) or num_layers < 1 or L - 1 < first_dense:
        raise ValueError(f"add_mtp_layers: num_layers={num_layers!r} must be >= 1, and the last main layer a MoE "
                         f"layer to copy the layout of (num_hidden_layers={L} > first_k_dense_replace={first_dense}).")
    index_file = out / "model.safetensors.index.json"
    files = sorted(p.name for p in out.glob("*.safetensors") if p.name != _MTP_FILE)
    index = json.loads(index_file.read_text()) if index_file.is_file() else {"metadata": {}, "weight_map": {}}
    if not index_file.is_file():
        for fname in files:
            with safe_open(str(out / fname), framework="pt") as st:
                index["weight_map"].update({n: fname for n in st.keys()})
    weight_map: dict[str, str] = index["weight_map"]
    if any(n.startswith(f"model.layers.{L}.") for n in weight_map):
        raise ValueError(f"add_mtp_layers: {out} already holds model.layers.{L}.* tensors.")

    def read(name: str) -> torch.Tensor:
        with safe_open(str(out / weight_map[name]), framework="pt") as st:
            return st.get_tensor(name)

    src = f"model.layers.{L - 1}."
    layer_names = sorted(n for n in weight_map if n.startswith(src))
    norm = read("model.norm.weight")
    D, dt = norm.shape[0], norm.dtype
    gen = torch.Generator().manual_seed(seed + 7919)  # its own stream: the main weights stay as they were
    tensors: dict[str, torch.Tensor] = {}
    for i in range(num_layers):
        p = f"model.layers.{L + i}."
        for name in layer_names:  # a fixed order: same seed, same bytes
            t = read(name)
            new = p + name[len(src):]
            fresh = (_CORRECTION_STD * torch.randn(t.shape, generator=gen) if name.endswith("e_score_correction_bias")
                     else _draw(new, t, gen, init_std))
            tensors[new] = fresh.to(t.dtype)
        for name, shape in (("enorm.weight", (D,)), ("hnorm.weight", (D,)), ("eh_proj.weight", (D, 2 * D)),
                            ("shared_head.norm.weight", (D,))):
            tensors[p + name] = _draw(p + name, torch.empty(shape), gen, init_std).to(dt)
        if embeddings:  # DeepSeek-V3's MTP layer holds copies of the main embedding and head
            embed = read("model.embed_tokens.weight")
            tensors[p + "embed_tokens.weight"] = embed.clone()
            tensors[p + "shared_head.head.weight"] = (embed if config.get("tie_word_embeddings")
                                                      else read("lm_head.weight")).clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / _MTP_FILE), metadata={"format": "pt"})
    umask_mode([out / _MTP_FILE])
    weight_map.update({n: _MTP_FILE for n in tensors})
    index["weight_map"] = dict(sorted(weight_map.items()))
    if "total_size" in index.get("metadata", {}):
        index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in tensors.values())
    index_file.write_text(json.dumps(index, indent=2) + "\n")
    config["num_nextn_predict_layers"] = num_layers
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


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
