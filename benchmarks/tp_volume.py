"""Tensor parallelism on CPU: per-rank weight bytes read and per-step collective volume at TP 1 / 2 / 4.

Weight bytes are measured: each TP rank of a tiny Qwen3-MoE checkpoint (8 q heads, 4 kv heads, one dense layer,
8 experts, bf16 files) is loaded through the engine's loader, which records the bytes it read per checkpoint
tensor (engine/rank/loader.load_plan's read_bytes), with the experts split by intermediate size over the TP group
(`-tp N` alone); with `-tp N -ep W` a rank reads 1/W of the experts whole instead, as at EP W without TP.
The collective volume of one step of T tokens is counted from the layer structure the engine runs (per rank,
bytes sent into the collective): one [T, D] all-reduce per attention layer and per dense MLP (row-parallel), one
for the vocab-parallel embedding, and per MoE layer one [T, D] all-reduce (experts split, "split") or one
[ceil(T/N), D] x N all-gather of the token slices (EP over the world, "ep"); the logits' [S, V/N] x N all-gather;
the tokens' broadcast is S int64. No timing: CPU numbers say nothing of NVLink.

    python -m moelink.benchmarks.tp_volume --out benchmarks/results/tp_volume_cpu.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

SHAPE = dict(arch="qwen3_moe", num_layers=4, hidden_size=256, num_experts=8, top_k=2, num_heads=8, num_kv_heads=4,
             head_dim=32, moe_intermediate_size=128, intermediate_size=512, vocab_size=4096, mlp_only_layers=(0,),
             dtype="bfloat16")


class _LoadOnlyTP:
    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


def weight_bytes(path: str, tp: int) -> dict:
    from moelink.engine.config.model import ModelConfig
    from moelink.engine.rank.loader import load_model
    from moelink.kernels.ops import ReferenceKernels

    cfg = ModelConfig.from_pretrained(path, "bfloat16")
    read: dict[str, int] = {}
    load_model(cfg, ReferenceKernels(), torch.device("cpu"), tp=_LoadOnlyTP(0, tp) if tp > 1 else None,
               read_bytes=read)
    experts = sum(n for k, n in read.items() if ".experts." in k)
    return {"total": sum(read.values()), "experts": experts, "non_expert": sum(read.values()) - experts}


def step_volume(tp: int, tokens: int, sampled: int, moe: str, dtype_bytes: int = 2) -> dict:
    """Bytes one rank sends into TP collectives in one step of `tokens` tokens, `sampled` of which sample; `moe`:
    "split" (experts split by TP: an all-reduce per MoE block) or "ep" (token slices all-gathered)."""
    if tp == 1:
        return {"all_reduce": 0, "all_gather": 0, "broadcast": 0}
    D, L, V = SHAPE["hidden_size"], SHAPE["num_layers"], SHAPE["vocab_size"]
    dense = len(SHAPE["mlp_only_layers"])
    row = tokens * D * dtype_bytes
    all_reduce = row * (1 + L + dense)  # embedding, every attention o_proj, every dense down_proj
    all_gather = sampled * (-(-V // tp)) * dtype_bytes
    if moe == "split":
        all_reduce += (L - dense) * row
    else:
        all_gather += (L - dense) * -(-tokens // tp) * D * dtype_bytes
    return {"all_reduce": all_reduce, "all_gather": all_gather, "broadcast": sampled * 8}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from moelink.engine.tools.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory() as d:
        path = str(make_tiny_model(Path(d), **SHAPE))
        rows = []
        for tp in (1, 2, 4):
            w = weight_bytes(path, tp)
            rows.append({"tp": tp, "weight_bytes_per_rank": w, "collective_bytes_per_rank": {
                moe: {"decode_step_batch1": step_volume(tp, 1, 1, moe),
                      "decode_step_batch64": step_volume(tp, 64, 64, moe),
                      "prefill_step_2048": step_volume(tp, 2048, 1, moe)} for moe in ("split", "ep")}})
    result = {"benchmark": "tp_volume", "shape": {k: list(v) if isinstance(v, tuple) else v for k, v in SHAPE.items()},
              "rows": rows}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
