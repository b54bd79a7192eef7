"""Tiny checkpoints of the 2026 families with their MTP module, for tests/engine/test_spec_decode_mtp_families.py:
a random module (the family's tiny preset, `make_tiny_model(..., extra={"num_nextn_predict_layers": 1})`), and a
"bigram" copy whose module guesses the main model's next token, so drafts are accepted often and rejected too.

Ling hybrid (engine/models/bailing_hybrid/mtp.py) shares the main embedding and head, so its bigram is DeepSeek's
(tests/helpers/mtp_checkpoints.py): the main layers' outputs scaled down (`main_scale`: every attention.dense and
down_proj, KDA's and MLA's, dense and experts'), the main model's greedy token after x is nearly
argmax(lm_head(norm(emb(x)))); the module computes that of its input token: eh_proj = [I | 0], enorm = 1, its dense
and down_proj zero, final_layernorm the main model's final norm.

LongCat-Flash's bigram (engine/models/longcat_flash/mtp.py): with the main layers' attention outputs scaled down (`main_scale`, every o_proj: attention is the only
part of a layer that mixes positions; the MLPs, the experts and the zero-computation ones act per token), the main
model's greedy token after x is nearly its greedy token after the one-token prompt [x]. LongCat's MTP module has an
embedding of its own, so it can hold that answer: row x = G[x], the main model's final-normed state for [x]
(transformers' own forward, float64). With enorm = 1, eh_proj = [I | 0], the inner layer's o_proj and down_proj
zero and the final norm 1, the module's output is G[x] / rms(G[x]): the same argmax under the main model's head.
`mtp_scale` > 0 keeps the module's own computation at that scale (its attention, KV cache and input state count).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moelink.engine.models.longcat_flash.mtp import LAYER, PREFIX
from moelink.engine.tools.tiny_model import make_tiny_model

VOCAB = 400


def make_family_mtp(out: Path, arch: str, seed: int = 0) -> Path:
    """The tiny `arch` preset with its random MTP module."""
    return make_tiny_model(out, arch, seed=seed, extra={"num_nextn_predict_layers": 1})


def bigram_ling_mtp(src: Path, dst: Path, main_scale: float = 0.02, mtp_scale: float = 0.0) -> Path:
    """A copy of the Ling hybrid checkpoint `src` whose MTP module guesses the main model's next token."""
    dst = Path(dst)
    shutil.copytree(src, dst)
    L = json.loads((dst / "config.json").read_text())["num_hidden_layers"]
    p = f"model.layers.{L}."
    main = load_file(dst / "model.safetensors")
    norm = main["model.norm.weight"]
    for name, t in main.items():
        if name.endswith(("attention.dense.weight", "down_proj.weight")):
            main[name] = t * main_scale
    save_file(main, str(dst / "model.safetensors"), metadata={"format": "pt"})
    mtp = load_file(dst / "mtp.safetensors")
    for name, t in mtp.items():
        if name.endswith(("attention.dense.weight", "down_proj.weight")):
            mtp[name] = t * mtp_scale
        elif name == p + "eh_proj.weight":
            D = t.shape[0]
            mtp[name] = torch.cat([torch.eye(D, dtype=t.dtype), mtp_scale * t[:, D:]], dim=1)
        elif name == p + "enorm.weight":
            mtp[name] = torch.ones_like(t)
        elif name == p + "final_layernorm.weight":
            mtp[name] = norm.clone()
    save_file(mtp, str(dst / "mtp.safetensors"), metadata={"format": "pt"})
    return dst


def bigram_longcat_mtp(src: Path, dst: Path, main_scale: float = 0.05, mtp_scale: float = 0.0) -> Path:
    """A copy of `src` whose MTP module guesses the main model's next token (module docstring)."""
    from transformers import LongcatFlashForCausalLM

    dst = Path(dst)
    shutil.copytree(src, dst)
    main_file, mtp_file = dst / "model.safetensors", dst / "mtp.safetensors"
    main = load_file(main_file)
    for name, t in main.items():
        if name.endswith("o_proj.weight"):
            main[name] = t * main_scale
    save_file(main, str(main_file), metadata={"format": "pt"})
    model = LongcatFlashForCausalLM.from_pretrained(dst, dtype=torch.float64, experts_implementation="eager").eval()
    with torch.no_grad():
        G_VD = model.model(input_ids=torch.arange(model.config.vocab_size)[:, None]).last_hidden_state[:, 0]
    mtp = load_file(mtp_file)
    D = G_VD.shape[1]
    for name, t in mtp.items():
        if name == PREFIX + "embed_tokens.weight":
            mtp[name] = G_VD.to(t.dtype)
        elif name in (LAYER + "enorm.m.weight", PREFIX + "norm.weight"):
            mtp[name] = torch.ones_like(t)
        elif name == LAYER + "eh_proj.weight":
            mtp[name] = torch.cat([torch.eye(D, dtype=t.dtype), mtp_scale * t[:, D:]], dim=1)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            mtp[name] = t * mtp_scale
    save_file(mtp, str(mtp_file), metadata={"format": "pt"})
    return dst


__all__ = ["VOCAB", "bigram_ling_mtp", "bigram_longcat_mtp", "make_family_mtp"]
