"""Tiny Qwen3-Next checkpoints with an MTP module (engine/tools/qwen_mtp_checkpoint.py) for the hybrid MTP tests:
a random module, and a "bigram" copy whose module guesses the main model's next token (drafts accepted often and
rejected too)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from moelink.engine.tools.qwen_mtp_checkpoint import add_qwen_mtp_module


def with_mtp(src: str | Path, dst: Path, seed: int = 3) -> Path:
    """A copy of the checkpoint `src` with a random MTP module appended."""
    shutil.copytree(src, dst)
    add_qwen_mtp_module(dst, seed=seed)
    return dst


def bigram_mtp(src: str | Path, dst: Path, main_scale: float = 0.01, mtp_scale: float = 0.05) -> Path:
    """A copy of `src` (with an MTP module) whose main model's mixers and MLPs are scaled by `main_scale` (it
    predicts nearly a bigram of its last token), and whose MTP module's fc passes the token's embedding through
    (its hidden half, o_proj and down_proj kept at `mtp_scale`, so its attention and KV cache still count) with
    the main model's final norm."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = {f: load_file(f) for f in sorted(Path(dst).glob("*.safetensors"))}
    norm = next(t["model.norm.weight"] for t in tensors.values() if "model.norm.weight" in t)
    for f, ts in tensors.items():
        for name, t in ts.items():
            if name.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight")):
                ts[name] = t * (mtp_scale if name.startswith("mtp.") else main_scale)
            elif name == "mtp.fc.weight":
                D = t.shape[0]
                ts[name] = torch.cat([torch.eye(D, dtype=t.dtype), mtp_scale * t[:, D:]], dim=1)
            elif name == "mtp.pre_fc_norm_embedding.weight":
                ts[name] = torch.zeros_like(t)  # zero-centred: a plain RMSNorm
            elif name == "mtp.norm.weight":
                ts[name] = norm.clone()
        save_file(ts, str(f), metadata={"format": "pt"})
    return Path(dst)


__all__ = ["bigram_mtp", "with_mtp"]
