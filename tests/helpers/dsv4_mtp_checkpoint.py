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
import shutil
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


def bigram_dsv4_mtp(ckpt: tuple[str, str, dict], out: Path, main_scale: float = 0.05) -> tuple[str, str, dict]:
    """A copy of `ckpt` (save_dsv4_with_mtp's triple) whose MTP layer drafts what the main model emits, so that its
    drafts are accepted often (as tests/helpers/mtp_checkpoints.bigram_mtp does for DeepSeek-V3). With every main
    layer's outputs scaled by `main_scale` (attn.wo_b, the experts' and the shared expert's w2), the streams stay near
    the embedding of the last token repeated n times (hyper-connection mixing is doubly stochastic: equal streams stay
    equal) and the main model's greedy token after x is nearly argmax(head(norm(emb(x)))), a bigram. The MTP layer
    computes that bigram of its token: e_proj = I, enorm = 1, h_proj = 0 (the streams dropped), its block's
    attn.wo_b and w2s zero (the block adds nothing), its norm the main model's final norm. Both the checkpoint and its
    `_full` transformers copy (the oracle's) get the same weights."""
    path, full, own = ckpt
    L = DSV4_TINY["num_hidden_layers"]
    out = Path(out)
    new_full = out.parent / (out.name + "_full")
    shutil.copytree(path, out)
    shutil.copytree(full, new_full)
    main_out = lambda n: n.endswith(("attn.wo_b.weight", ".w2.weight"))  # noqa: E731
    (st,) = out.glob("*.safetensors")
    t = load_file(str(st))
    D = t["mtp.0.e_proj.weight"].shape[0]
    own = {**own, "e_proj.weight": torch.eye(D, dtype=own["e_proj.weight"].dtype),
           "h_proj.weight": torch.zeros_like(own["h_proj.weight"]), "enorm.weight": torch.ones_like(own["enorm.weight"]),
           "norm.weight": t["model.norm.weight"].to(own["norm.weight"].dtype)}
    for name in t:
        if name.startswith("mtp.0.") and name[len("mtp.0."):] in own:
            t[name] = own[name[len("mtp.0."):]].to(t[name].dtype).clone()
        elif main_out(name):
            t[name] = t[name] * (0 if name.startswith("mtp.") else main_scale)
    save_file(t, str(st), metadata={"format": "pt"})
    (fst,) = new_full.glob("*.safetensors")
    f = load_file(str(fst))
    for name in f:
        if main_out(name):
            f[name] = f[name] * (0 if name.startswith(f"model.layers.{L}.") else main_scale)
    save_file(f, str(fst), metadata={"format": "pt"})
    return str(out), str(new_full), own


def mtp_oracle(full_path: str, own: dict):
    """DeepSeek's MTPBlock forward composed from transformers' own V4 modules (float64 model, its float32 parts as
    transformers keeps them): the MTP block is transformers' DeepseekV4DecoderLayer at index L of the `{out}_full`
    model, with DeepseekV4RMSNorm for enorm / hnorm / norm and DeepseekV4HyperHead for the MTP's hyper-head, over a
    whole sequence with transformers' sliding causal mask. Returns run(h_SnD, next_ids_S) -> (y_SnD, logits_SV)."""
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import create_sliding_window_causal_mask
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperHead, DeepseekV4RMSNorm

    hf = AutoModelForCausalLM.from_pretrained(full_path, dtype=torch.float64, experts_implementation="eager").eval()
    c = hf.config
    enorm, hnorm, norm = (DeepseekV4RMSNorm(c.hidden_size, c.rms_norm_eps).float() for _ in range(3))
    head = DeepseekV4HyperHead(c).float()
    with torch.no_grad():
        for m, k in ((enorm, "enorm.weight"), (hnorm, "hnorm.weight"), (norm, "norm.weight")):
            m.weight.copy_(own[k])
        head.hc_fn.copy_(own["hc_head_fn"]), head.hc_base.copy_(own["hc_head_base"])
        head.hc_scale.copy_(own["hc_head_scale"])
    e_proj, h_proj = own["e_proj.weight"], own["h_proj.weight"]

    @torch.no_grad()
    def run(h_SnD: torch.Tensor, next_ids_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(len(next_ids_S))[None]
        emb = hf.model.embed_tokens(next_ids_S[None])
        x = (enorm(emb) @ e_proj.T)[:, :, None, :] + hnorm(h_SnD[None]) @ h_proj.T
        rope = hf.model.rotary_emb(emb, position_ids=pos, layer_type="main")
        mask = create_sliding_window_causal_mask(config=c, inputs_embeds=emb, attention_mask=None, cache=None,
                                                 position_ids=pos)
        y = hf.model.layers[DSV4_TINY["num_hidden_layers"]](x, position_embeddings={"main": rope, "compress": rope}, position_ids=pos,
                               attention_mask=mask, input_ids=next_ids_S[None], cache=None)
        return y[0], hf.lm_head(norm(head(y)))[0]

    return run
