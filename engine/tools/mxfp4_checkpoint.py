"""`moelink quantize-mxfp4 SRC DST`: a float gpt-oss checkpoint saved by transformers -> the layout OpenAI publishes
gpt-oss in (MXFP4 experts), so tests and demos have MXFP4 checkpoints without a download.

What changes (kernels/mxfp4.py documents the layout): per layer, transformers' float
`mlp.experts.gate_up_proj` [E, D, 2I] and `mlp.experts.down_proj` [E, I, D] (x @ W orientation) are transposed to
[E, 2I, D] / [E, D, I] (output-channel major, gate/up rows still interleaved as transformers stores them) and
replaced by `*_blocks` uint8 [E, N, K/32, 16] + `*_scales` uint8 [E, N, K/32] (mxfp4_quantize: nearest e2m1
value, power-of-two scale per 32 values). Expert biases, attention, router, embeddings and norms are copied
as they are; config.json gets gpt-oss's `quantization_config`. Everything else in SRC (tokenizer files,
generation_config.json) is copied. transformers loads the result (dequantizing it on CPU), which is how the
tests check it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .file_modes import umask_mode

# gpt-oss's own published list: everything but the experts stays in its float dtype.
MODULES_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
_EXPERT_WEIGHTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")


def _quantize_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from moelink.kernels.mxfp4 import mxfp4_quantize

    out = {}
    for name, t in tensors.items():
        if name.endswith(_EXPERT_WEIGHTS):
            if t.dim() != 3:
                raise ValueError(f"{name} has shape {tuple(t.shape)}: expected transformers' [E, K, N] expert weight.")
            blocks, scales = mxfp4_quantize(t.transpose(1, 2))  # [E, N, K]: each row's K values in groups of 32
            out[f"{name}_blocks"], out[f"{name}_scales"] = blocks, scales
        else:
            out[name] = t
    return out


def quantize_mxfp4_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write the MXFP4 version of the float gpt-oss checkpoint in `src` to the new directory `dst`; returns dst."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"SRC={str(src)!r} is invalid: it has no config.json (a checkpoint saved by transformers).")
    config = json.loads(cfg_path.read_text())
    if config.get("model_type") != "gpt_oss":
        raise ValueError(f"model_type={config.get('model_type')!r} is invalid: quantize-mxfp4 converts gpt_oss "
                         "checkpoints (their experts' layout is the one MXFP4 is published in).")
    if config.get("quantization_config"):
        raise ValueError(f"SRC={str(src)!r} is already quantized "
                         f"(quant_method={config['quantization_config'].get('quant_method')!r}): give a float checkpoint.")
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"DST={str(dst)!r} is invalid: it exists and is not empty.")
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"SRC={str(src)!r} is invalid: it has no *.safetensors files.")
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    converted = 0
    for shard in shards:  # one shard in memory at a time
        tensors = _quantize_tensors(load_file(str(shard)))
        converted += sum(n.endswith("_blocks") for n in tensors)
        save_file(tensors, str(dst / shard.name), metadata={"format": "pt"})
        umask_mode([dst / shard.name])
        weight_map.update({n: shard.name for n in tensors})
    if converted == 0:
        raise ValueError(f"SRC={str(src)!r} has no '*{_EXPERT_WEIGHTS[0]}' / '*{_EXPERT_WEIGHTS[1]}' weights to quantize.")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        meta = json.loads(index.read_text()).get("metadata", {})
        (dst / index.name).write_text(json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))},
                                                 indent=2) + "\n")
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_NOT_CONVERTED}
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in src.iterdir():  # tokenizer, generation config, ...
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", index.name):
            shutil.copy2(f, dst / f.name)
    return dst


def _run(ns) -> int:
    out = quantize_mxfp4_checkpoint(ns.src, ns.dst)
    print(f"wrote {out}")
    return 0


def register_cli(subparsers) -> None:
    """Add `quantize-mxfp4 SRC DST` to an argparse subparsers object."""
    p = subparsers.add_parser("quantize-mxfp4", help="turn a float gpt-oss checkpoint into gpt-oss's published MXFP4 layout",
                              description=__doc__)
    p.add_argument("src", help="float gpt-oss checkpoint directory (saved by transformers)")
    p.add_argument("dst", help="output directory (new or empty)")
    p.set_defaults(func=_run)
