"""`moelink quantize-fp8 SRC DST [--block 128 128]`: a float checkpoint → the published FP8 block layout.

Every linear that DeepSeek-V3 ships in FP8 is block-quantized (kernels/fp8.block_quantize): attention
projections (q/k/v/o; MLA's q_a / q_b / q_proj, kv_a_proj_with_mqa, kv_b_proj), dense MLPs, shared experts and
routed experts (per expert, and the fused `experts.gate_up_proj` / `experts.down_proj` of transformers 5, whose
scales are `..._scale_inv` as transformers' FP8Experts names them). Each gets its float32 `weight_scale_inv`
beside it. The router gate, norms, embeddings, lm_head and biases stay as they are. config.json gains
`quantization_config`; the tokenizer and every other file is copied. Shards keep their names, one tensor in
memory at a time (plus its FP8 copy).

This is also what `--quantization fp8` does at load, tensor by tensor, so both give the same weights.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moelink.kernels.fp8 import DEFAULT_BLOCK, block_quantize

from .file_modes import umask_mode
from ..config.quantization import Fp8Config, quantization_config_dict

# The weights DeepSeek's FP8 release quantizes (the `mlp.gate.weight` router and `lm_head` are not matched; DeepSeek-V3.2's
# indexer: wq_b and wk, not weights_proj or k_norm); LongCat-Flash's sublayers numbered (`self_attn.0.`, `mlps.1.`);
# Hunyuan Hy4's published `linear_gate` (the attention's output gate, the MLPs' gate_proj) with its other linears;
# Ling's hybrid as it publishes them (`attention.*`, the output projection `attention.dense`, MLA's per-head output
# gate `attention.g_proj`, which KDA's full-rank gate shares the name of: moelink holds that one float, dequantized at
# load); gated DeltaNet's input and output projections (in_proj_ba / in_proj_b / in_proj_a stay float, as Qwen
# publishes them), Qwen's single `shared_expert` and HunYuan-MoE-V1's `shared_mlp`.
_QUANTIZED = re.compile(
    r"\.(self_attn\.(\d+\.)?(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|indexer\.wq_b"
    r"|indexer\.wk|linear_gate|index_q_proj|index_k_proj)"
    r"|attention\.(q_proj|k_proj|v_proj|dense|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|g_proj)"
    r"|linear_attn\.(in_proj_qkvz|in_proj_qkv|in_proj_z|out_proj)"
    r"|(mlp|mlps\.\d+|block_sparse_moe)\.(shared_experts?\.|shared_mlp\.)?(gate_proj|up_proj|down_proj|linear_gate)"
    r"|(mlp|block_sparse_moe)\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3))\.weight$"
    r"|\.(mlp)\.experts\.(gate_up_proj|down_proj)$"
)


def is_quantized_name(name: str) -> bool:
    """Whether the tool (and DeepSeek's release) stores the checkpoint tensor `name` in FP8."""
    return _QUANTIZED.search(name) is not None


def _scale_name(name: str) -> str:
    return name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"


def quantize_checkpoint(src: str | Path, dst: str | Path, block: tuple[int, int] = DEFAULT_BLOCK) -> Path:
    """Write the FP8 version of the float checkpoint `src` into `dst` (created; must not hold a checkpoint)."""
    src, dst = Path(src), Path(dst)
    cfg = Fp8Config(tuple(block))  # validates the block
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ValueError(f"SRC={str(src)!r} has no config.json: a Hugging Face checkpoint directory is required.")
    config = json.loads(config_file.read_text())
    if config.get("quantization_config"):
        raise ValueError(f"SRC={str(src)!r} is already quantized "
                         f"({config['quantization_config'].get('quant_method')!r}): give a float checkpoint.")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ValueError(f"SRC={str(src)!r} has no *.safetensors files.")
    if dst.resolve() == src.resolve():
        raise ValueError("DST must differ from SRC: the float checkpoint is read while the FP8 one is written.")
    if dst.exists() and any(dst.glob("*.safetensors")):
        raise ValueError(f"DST={str(dst)!r} already holds a checkpoint: give a new or empty directory.")
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for f in files:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                if is_quantized_name(name) and t.is_floating_point():
                    out[name], out[_scale_name(name)] = block_quantize(t, cfg.block)
                else:
                    out[name] = t
        save_file({k: v.contiguous() for k, v in out.items()}, str(dst / f.name), metadata={"format": "pt"})
        umask_mode([dst / f.name])
        weight_map.update({name: f.name for name in out})
    index = src / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = weight_map
        (dst / index.name).write_text(json.dumps(data, indent=2) + "\n")
    for other in src.iterdir():  # tokenizer, generation config, chat template ...
        if other.is_file() and other.suffix != ".safetensors" and other.name not in ("config.json", index.name):
            shutil.copy2(other, dst / other.name)
    config["quantization_config"] = quantization_config_dict(cfg)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst


def _main(ns: argparse.Namespace) -> int:
    out = quantize_checkpoint(ns.src, ns.dst, tuple(ns.block))
    print(f"wrote the FP8 ({ns.block[0]}x{ns.block[1]} blocks) checkpoint to {out}")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("quantize-fp8", help="write an FP8 block-scaled copy of a float checkpoint (DeepSeek-V3's "
                                            "published layout: weight + weight_scale_inv + quantization_config)")
    p.add_argument("src", help="a float Hugging Face checkpoint directory")
    p.add_argument("dst", help="the directory to write (new or empty)")
    p.add_argument("--block", type=int, nargs=2, default=list(DEFAULT_BLOCK), metavar=("BN", "BK"),
                   help="weight_block_size [rows, columns] (default 128 128, as published)")
    p.set_defaults(func=_main)
