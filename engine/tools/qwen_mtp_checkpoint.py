"""Append a random MTP module to a Qwen3-Next / Qwen3.5-MoE checkpoint written by transformers' `save_pretrained`.

transformers neither builds nor saves the MTP module these families publish (`_keys_to_ignore_on_load_unexpected =
["^mtp.*"]`), so a tiny test checkpoint gets one here, in the published names (engine/spec/heads/qwen_mtp.py):
`mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, `mtp.fc` [D, 2D], `mtp.layers.0.*` and `mtp.norm`, written
to mtp.safetensors and listed in model.safetensors.index.json; config.json (its text_config for a multimodal
Qwen3.5 checkpoint) gets mtp_num_hidden_layers = 1.

The decoder layer is laid out as the main model's: attention tensors shaped as a full-attention layer's, the MLP as
main layer 0's (the MTP layer's MLP kind follows layer 0's, engine/spec/heads/qwen_mtp.py), experts per expert or fused
as that layer holds them. Every tensor is drawn fresh: norms zero-centred (stored w, applied as 1 + w) with noise,
matrices fan-in scaled, the router with a gain.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .file_modes import umask_mode

MTP_FILE = "mtp.safetensors"
_ARCHS = ("Qwen3NextForCausalLM", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM")


def _draw(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith(("norm.weight", "layernorm.weight")):  # zero-centred RMSNorm weights
        return 0.1 * torch.randn(shape, generator=gen)
    gain = 2.0 if name.endswith("mlp.gate.weight") else 1.0
    return gain / math.sqrt(shape[-1]) * torch.randn(shape, generator=gen)


def add_qwen_mtp_module(out: str | Path, *, seed: int = 0) -> None:
    """Append one random MTP module to the Qwen3-Next / Qwen3.5-MoE checkpoint in `out` (module docstring)."""
    out = Path(out)
    config = json.loads((out / "config.json").read_text())
    arch = (config.get("architectures") or [None])[0]
    if arch not in _ARCHS:
        raise ValueError(f"add_qwen_mtp_module: architecture {arch!r} is not a Qwen3-Next / Qwen3.5-MoE checkpoint "
                         f"(one of {', '.join(_ARCHS)}).")
    text = config.get("text_config") or config
    layer_types = text["layer_types"]
    full = layer_types.index("full_attention")
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {"metadata": {}, "weight_map": {}}
    if not index_file.is_file():
        for f in sorted(out.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                index["weight_map"].update({n: f.name for n in st.keys()})
    weight_map: dict[str, str] = index["weight_map"]
    if any(n.startswith("mtp.") for n in weight_map):
        raise ValueError(f"add_qwen_mtp_module: {out} already holds mtp.* tensors.")
    layers = "model.language_model.layers." if any(n.startswith("model.language_model.") for n in weight_map) \
        else "model.layers."

    def shape(name: str) -> tuple[tuple[int, ...], torch.dtype]:
        with safe_open(str(out / weight_map[name]), framework="pt") as st:
            t = st.get_slice(name)
            return tuple(t.get_shape()), getattr(torch, {"F64": "float64", "F32": "float32",
                                                         "BF16": "bfloat16", "F16": "float16"}[t.get_dtype()])

    template: dict[str, str] = {}  # MTP name -> the main tensor it is shaped as
    for src_layer, parts in ((full, ("input_layernorm.", "self_attn.", "post_attention_layernorm.")), (0, ("mlp.",))):
        p = f"{layers}{src_layer}."
        for n in sorted(weight_map):
            if n.startswith(p) and n[len(p):].startswith(parts):
                template["mtp.layers.0." + n[len(p):]] = n
    D, dt = shape(f"{layers}{full}.input_layernorm.weight")[0][0], shape(f"{layers}{full}.input_layernorm.weight")[1]
    gen = torch.Generator().manual_seed(seed + 104729)  # its own stream: the main weights stay as they were
    tensors: dict[str, torch.Tensor] = {}
    for name in ("mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight"):
        tensors[name] = _draw(name, (D,), gen).to(dt)
    tensors["mtp.fc.weight"] = _draw("mtp.fc.weight", (D, 2 * D), gen).to(dt)
    for name, src in template.items():  # sorted: same seed, same bytes
        s, sdt = shape(src)
        tensors[name] = _draw(name, s, gen).to(sdt)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / MTP_FILE), metadata={"format": "pt"})
    umask_mode([out / MTP_FILE])
    weight_map.update({n: MTP_FILE for n in tensors})
    index["weight_map"] = dict(sorted(weight_map.items()))
    if "total_size" in index.get("metadata", {}):
        index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in tensors.values())
    index_file.write_text(json.dumps(index, indent=2) + "\n")
    text["mtp_num_hidden_layers"] = 1
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


__all__ = ["MTP_FILE", "add_qwen_mtp_module"]
