"""Ling's hybrid tiny checkpoint: `moelink make-tiny-model --arch bailing_hybrid` and the test suite's
(tests/helpers/drawn_presets.py). Built by transformers' own BailingHybridForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (norm weights and the correction bias random).

Five layers, MLA (q LoRA 16, latent 16, interleaved rope, the per-head output gate) on 1 and 4, KDA (4 heads of 16,
full-rank gates, the safe forget gate) on the others; two dense layers; 8 experts in 2 groups (1 chosen, top-2) with
the correction bias and a shared expert.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ...tools.tiny_families import Preset, TinyArch, preset_writer, published_as, random_module

BAILING: Preset = ("BailingHybridConfig", "BailingHybridForCausalLM", dict(
    hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=5, num_attention_heads=4,
    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=16,
    num_local_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=2,
    short_conv_kernel_size=4, num_mtp_layers=0, rope_theta=10000.0, rms_norm_eps=1e-6, pad_token_id=None,
    eos_token_id=None,
    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"]))

_write_main = preset_writer(BAILING, drawn=True)


def write(out: Path, *, seed: int, dtype: torch.dtype, fmt: str, overrides: Mapping) -> object:
    """TinyArch.write: the preset with `overrides`; with num_nextn_predict_layers=1 (or num_mtp_layers=1) its MTP
    module too (`add_mtp_module`)."""
    n = overrides.get("num_nextn_predict_layers", overrides.get("num_mtp_layers", 0))
    main = {k: v for k, v in overrides.items() if k not in ("num_nextn_predict_layers", "num_mtp_layers")}
    path = _write_main(out, seed=seed, dtype=dtype, fmt=fmt, overrides={**main, "num_mtp_layers": n})
    if n:
        if n != 1:
            raise ValueError(f"num_nextn_predict_layers={n!r}: the tiny Ling hybrid writes one MTP module (0 or 1).")
        add_mtp_module(out, seed=seed)
    return path


def add_mtp_module(out: str | Path, *, seed: int = 0) -> None:
    """Append MTP module 0 in the published names (mtp.py) to the tiny checkpoint in `out` (transformers neither
    builds nor saves it): `model.layers.{L}.*` in mtp.safetensors, its decoder layer shaped as the last main layer
    (MLA + routed experts in the preset), drawn from a stream of its own; norms around 1, matrices fan-in scaled,
    the correction bias small."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ...tools.file_modes import umask_mode

    out = Path(out)
    if (out / "model.safetensors.index.json").exists():
        raise ValueError(f"add_mtp_module: {out} is sharded; the tiny writer appends to one model.safetensors only.")
    L = int(json.loads((out / "config.json").read_text())["num_hidden_layers"])
    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        src = f"model.layers.{L - 1}."
        template = {f"model.layers.{L}.{n[len(src):]}": st.get_tensor(n) for n in st.keys() if n.startswith(src)}
        norm = st.get_tensor("model.norm.weight")
    D, p = norm.shape[0], f"model.layers.{L}."
    template.update({p + "enorm.weight": norm, p + "hnorm.weight": norm, p + "final_layernorm.weight": norm,
                     p + "eh_proj.weight": norm.new_zeros(D, 2 * D)})
    save_file(random_module(template, seed), str(out / "mtp.safetensors"), metadata={"format": "pt"})
    umask_mode([out / "mtp.safetensors"])


# fp8: `moelink quantize-fp8` in Ling's published names (tests/engine/test_fp8_hybrid_families.py).
ARCHS = {
    "bailing_hybrid": TinyArch("BailingHybridForCausalLM", "Ling hybrid (bailing_hybrid)", ("float", "fp8"), write=write),
    # Ling 3.0 as vLLM names it (BailingMoeV3ForCausalLM): the same files, config.json's model_type the release's own
    # (bailing_moe_v3, which transformers does not know: read by BailingHybridConfig through the registry).
    "bailing_moe_v3": TinyArch("BailingMoeV3ForCausalLM", "Ling 3.0 (vLLM's BailingMoeV3ForCausalLM)", ("float",),
                               write=published_as(write, "BailingMoeV3ForCausalLM", model_type="bailing_moe_v3")),
}

__all__ = ["ARCHS", "BAILING", "add_mtp_module", "write"]
