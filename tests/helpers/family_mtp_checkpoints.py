"""Tiny checkpoints of the 2026 families with their MTP module, for tests/engine/test_spec_decode_mtp_families.py:
a random module (the family's tiny preset, `make_tiny_model(..., extra={"num_nextn_predict_layers": 1})`), and a
"bigram" copy whose module guesses the main model's next token, so drafts are accepted often and rejected too.

Ling hybrid (engine/models/bailing_hybrid/mtp.py), Hy4 (engine/models/hy_v4/mtp.py) and GLM-5.3-Flash
(engine/models/glm5_next/mtp.py) share the main embedding and head, so their bigram is DeepSeek's
(tests/helpers/mtp_checkpoints.py, `bigram_shared_head_mtp`): the main layers' outputs scaled down (`main_scale`:
every attention output projection and down_proj, linear attention's and MLA's, dense, shared and routed experts'),
the main model's greedy token after x is nearly argmax(lm_head(norm(emb(x)))) (Hy4's and GLM-5.3's hyper-connection
streams then all carry about emb(x), and their collapse, a positive mix of them, normalises to the same state); the
module computes that of its input token: eh_proj = [I | 0], enorm = 1, its output projections zero, its final norm
the main model's.

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


def bigram_shared_head_mtp(src: Path, dst: Path, *, outputs: tuple[str, ...], main_norm: str, eh_proj: str,
                           enorm: str, final_norm: str, main_scale: float = 0.02, mtp_scale: float = 0.0) -> Path:
    """A copy of the checkpoint `src` (model.safetensors + mtp.safetensors) whose MTP module guesses the main model's
    next token (module docstring): tensors ending with one of `outputs` scaled by `main_scale` in the main model and
    `mtp_scale` in the module; the module's `eh_proj` [I | mtp_scale * W_h], `enorm` 1, `final_norm` the main
    model's `main_norm`."""
    dst = Path(dst)
    shutil.copytree(src, dst)
    main = load_file(dst / "model.safetensors")
    norm = main[main_norm]
    for name, t in main.items():
        if name.endswith(outputs):
            main[name] = t * main_scale
    save_file(main, str(dst / "model.safetensors"), metadata={"format": "pt"})
    mtp = load_file(dst / "mtp.safetensors")
    for name, t in mtp.items():
        if name.endswith(outputs):
            mtp[name] = t * mtp_scale
        elif name == eh_proj:
            D = t.shape[0]
            mtp[name] = torch.cat([torch.eye(D, dtype=t.dtype), mtp_scale * t[:, D:]], dim=1)
        elif name == enorm:
            mtp[name] = torch.ones_like(t)
        elif name == final_norm:
            mtp[name] = norm.clone()
    save_file(mtp, str(dst / "mtp.safetensors"), metadata={"format": "pt"})
    return dst


def bigram_ling_mtp(src: Path, dst: Path, main_scale: float = 0.02, mtp_scale: float = 0.0) -> Path:
    """A copy of the Ling hybrid checkpoint `src` whose MTP module guesses the main model's next token."""
    L = json.loads((Path(src) / "config.json").read_text())["num_hidden_layers"]
    p = f"model.layers.{L}."
    return bigram_shared_head_mtp(src, dst, outputs=("attention.dense.weight", "down_proj.weight"),
                                  main_norm="model.norm.weight", eh_proj=p + "eh_proj.weight", enorm=p + "enorm.weight",
                                  final_norm=p + "final_layernorm.weight", main_scale=main_scale, mtp_scale=mtp_scale)


def bigram_hy_v4_mtp(src: Path, dst: Path, main_scale: float = 0.02, mtp_scale: float = 0.0) -> Path:
    """A copy of the Hy4 checkpoint `src` whose MTP module guesses the main model's next token (the routed experts'
    fused down_proj scaled too)."""
    from moelink.engine.models.hy_v4.mtp import PREFIX as p

    return bigram_shared_head_mtp(src, dst, outputs=("o_proj.weight", "down_proj.weight", "experts.down_proj"),
                                  main_norm="model.norm.weight", eh_proj=p + "eh_proj.weight", enorm=p + "enorm.weight",
                                  final_norm=p + "final_layernorm.weight", main_scale=main_scale, mtp_scale=mtp_scale)


def bigram_glm5_next_mtp(src: Path, dst: Path, main_scale: float = 0.02, mtp_scale: float = 0.0) -> Path:
    """A copy of the GLM-5.3-Flash checkpoint `src` whose MTP module guesses the main model's next token."""
    L = json.loads((Path(src) / "config.json").read_text())["text_config"]["num_hidden_layers"]
    p = f"model.language_model.layers.{L}."
    return bigram_shared_head_mtp(src, dst, outputs=("o_proj.weight", "down_proj.weight"),
                                  main_norm="model.language_model.norm.weight", eh_proj=p + "eh_proj.weight",
                                  enorm=p + "enorm.weight", final_norm=p + "shared_head.norm.weight",
                                  main_scale=main_scale, mtp_scale=mtp_scale)


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


__all__ = ["VOCAB", "bigram_glm5_next_mtp", "bigram_hy_v4_mtp", "bigram_ling_mtp", "bigram_longcat_mtp",
           "bigram_shared_head_mtp", "make_family_mtp"]
