"""A tiny DeepSeek-V4 checkpoint with one MTP layer in DeepSeek's published layout (`mtp.0.*`), and the
transformers modules it was cut from (the oracle of tests/engine/test_dsv4_mtp.py).

transformers builds no MTP module (its deepseek_v4 ignores `mtp.*` on load), so the MTP block is built as
transformers' own DeepseekV4DecoderLayer at index L = num_hidden_layers of a model one layer longer, with a sliding
attention (DeepSeek's compress_ratios end with a 0 for the MTP layer) and a top-k routed MoE; save_pretrained writes its
tensors under `model.layers.{L}.` in the published names, which are moved to `mtp.0.`. The MTP's own tensors
(e_proj, h_proj, enorm, hnorm, norm, hc_head_fn / base / scale) are random; the embedding and head are the main
model's (DeepSeek publishes no copies).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .dsv4_checkpoint import DSV4_TINY, _save_tokenizer, build_dsv4_model, dsv4_config


def save_dsv4_with_mtp(out: Path, seed: int = 0, **overrides) -> tuple[str, str, dict]:
    """(checkpoint path, the path of transformers' model of L + 1 layers whose last is the MTP block (beside it:
    `{out}_full`, to be loaded with from_pretrained, which keeps transformers' float32 modules float32), the MTP's
    own tensors)."""
    L = DSV4_TINY["num_hidden_layers"]
    cfg = dsv4_config(num_hidden_layers=L + 1, layer_types=DSV4_TINY["layer_types"] + ["sliding_attention"],
                      mlp_layer_types=DSV4_TINY["mlp_layer_types"] + ["moe"], **overrides)
    model = build_dsv4_model(cfg, seed)
    out = Path(out)
    full = out.parent / (out.name + "_full")
    model.save_pretrained(full)
    model.save_pretrained(out)
    _save_tokenizer(out)
    (st,) = out.glob("*.safetensors")
    tensors = load_file(str(st))
    layer = f"model.layers.{L}."
    kept = {n: t for n, t in tensors.items() if not n.startswith(layer)}
    # DeepSeek's files name attention's kv norm `attn.kv_norm.weight` (save_pretrained: `attn.norm.weight`)
    mtp = {"mtp.0." + n[len(layer):].replace("attn.norm.weight", "attn.kv_norm.weight"): t
           for n, t in tensors.items() if n.startswith(layer)}
    D, n = cfg.hidden_size, cfg.hc_mult
    g = torch.Generator().manual_seed(seed + 7)
    rand = lambda *shape, s=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * s  # noqa: E731
    own = {"e_proj.weight": rand(D, D, s=0.2), "h_proj.weight": rand(D, D, s=0.2),
           "enorm.weight": 1 + rand(D, s=0.1), "hnorm.weight": 1 + rand(D, s=0.1), "norm.weight": 1 + rand(D, s=0.1),
           "hc_head_fn": rand(n, n * D, s=0.1), "hc_head_base": rand(n, s=0.5), "hc_head_scale": 1 + rand(1, s=0.3)}
    mtp.update({"mtp.0." + k: v for k, v in own.items()})
    st.unlink()
    save_file({**kept, **mtp}, str(out / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((out / "config.json").read_text())
    raw.update(num_hidden_layers=L, layer_types=raw["layer_types"][:L], mlp_layer_types=raw["mlp_layer_types"][:L],
               num_nextn_predict_layers=1)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return str(out), str(full), own
