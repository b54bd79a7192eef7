"""Tiny checkpoints with an MTP layer for the speculative-decoding tests (engine/spec/proposer/mtp.py).

`make_mtp_model`: a random DeepSeek-V3 / GLM-4-MoE checkpoint with one random MTP layer (make_tiny_model's
num_nextn_predict_layers). Random drafts are seldom accepted.

`bigram_mtp`: a copy whose MTP layer is built to guess what the main model will emit, so that drafts are accepted
often. With its main layers' outputs scaled down (`main_scale`: every o_proj and down_proj), the main model's
greedy token after x is nearly argmax(lm_head(norm(emb(x)))), a bigram. The MTP layer is made to compute that
same bigram of its input token: eh_proj = [I | 0] keeps enorm(emb(tok)) and drops the hidden state, enorm = 1
(so RMS-normalising again changes nothing), its o_proj and down_proj are zero (the decoder layer adds nothing to
the residual) and shared_head.norm is the main model's final norm, with the main embedding and head. Its draft
after x is then the main model's bigram of x: right whenever the main layers' small contribution does not change
the argmax.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moelink.engine.tools.tiny_model import make_tiny_model

VOCAB = 320


def make_mtp_model(out: Path, arch: str, seed: int = 0) -> Path:
    """A tiny `arch` (deepseek_v3 or glm4_moe) checkpoint with one random MTP layer (its own embedding and head
    copies, as DeepSeek-V3 publishes them)."""
    return make_tiny_model(out, arch, num_layers=2, num_experts=6, vocab_size=VOCAB, max_position_embeddings=256,
                           seed=seed, extra={"num_nextn_predict_layers": 1})


def bigram_mtp(src: Path, dst: Path, main_scale: float = 0.1, mtp_scale: float = 0.0) -> Path:
    """A copy of the MTP checkpoint `src` whose MTP layer guesses the main model's next token (module docstring).
    `mtp_scale` > 0 keeps the MTP layer's own computation, scaled: its o_proj and down_proj, and eh_proj's
    hidden-state half (the random one of `src`), so its attention, KV cache and input state count a little."""
    dst = Path(dst)
    shutil.copytree(src, dst)
    L = json.loads((dst / "config.json").read_text())["num_hidden_layers"]
    files = sorted(dst.glob("*.safetensors"))
    tensors = {f: load_file(f) for f in files}
    norm = next(t["model.norm.weight"] for t in tensors.values() if "model.norm.weight" in t)
    p = f"model.layers.{L}."
    for f, ts in tensors.items():
        for name, t in ts.items():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                ts[name] = t * (mtp_scale if name.startswith(p) else main_scale)
            elif name == p + "eh_proj.weight":
                D = t.shape[0]
                ts[name] = torch.cat([torch.eye(D, dtype=t.dtype), mtp_scale * t[:, D:]], dim=1)
            elif name in (p + "enorm.weight", p + "hnorm.weight"):
                ts[name] = torch.ones_like(t)
            elif name == p + "shared_head.norm.weight":
                ts[name] = norm.clone()
        save_file(ts, str(f), metadata={"format": "pt"})
    return dst
