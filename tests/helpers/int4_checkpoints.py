"""Tiny Qwen3-MoE and DeepSeek-V3 (Kimi K2 / K2.5-shaped) checkpoints with INT4 experts written by compressed-tensors'
own code, for tests/engine/test_int4_checkpoint.py and tests/ep/test_ep_int4.py (the builder, the presets and the
writers live in engine/tools/tiny_families.py and tiny_formats.py, what `moelink make-tiny-model --format int4 / gptq /
awq` writes; the oracle, `decompressed_copy`, is here).

transformers builds and saves each model (float64); `int4_checkpoint`
then quantizes every routed expert's gate_proj / up_proj / down_proj the way llm-compressor's W4A16 recipe does:
the scale and zero point from compressed-tensors' `calculate_qparams` over each group's min / max, and the packed
tensors from its `PackedQuantizationCompressor.compress` (`weight_packed` int32 [N, K/8], `weight_scale` [N, K/G],
`weight_shape`, and `weight_zero_point` int32 [N/8, K/G] when asymmetric), with config.json's quantization_config
from its `QuantizationConfig.model_dump()` (quant_method compressed-tensors, format pack-quantized), as Kimi K2
Thinking ships (group 32, symmetric, everything but the routed experts ignored). `scope="all"` quantizes the
attention, dense and shared MLPs too (as community W4A16 releases of Qwen3-MoE do). `decompressed_copy` is the float64
checkpoint holding exactly what the INT4 one means, made by the same library's `decompress` (the oracle's weights);
`gptq_checkpoint` / `awq_checkpoint` rewrite the same integers in GPTQ's and AWQ's own layouts.
`kimi_k25_checkpoint` (engine/models/deepseek/tiny.py) wraps a DeepSeek-V3 one as Kimi K2.5 publishes it
(KimiK25ForConditionalGeneration, `language_model.model.*`, `language_model.lm_head.weight`, a vision tower's tensors
beside them).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from moelink.engine.tools.tiny_families import INT4_TINY, save_preset  # noqa: F401
from moelink.engine.models.deepseek.tiny import kimi_k25_checkpoint  # noqa: F401
from moelink.engine.tools.tiny_formats import (AWQ_ORDER, KIMI_IGNORE, awq_checkpoint, compress_weight,  # noqa: F401
                                               gptq_checkpoint, int4_checkpoint, packed_rewrite, quantization_config,
                                               rewrite_checkpoint as _rewrite)
from moelink.engine.tools.tiny_formats import int4_scheme as _scheme  # noqa: F401


def save_tiny(out: Path, name: str, seed: int = 0) -> str:
    """transformers' own model on INT4_TINY[name] (random norms and correction bias), saved float64 with the tiny
    tokenizer."""
    return save_preset(out, INT4_TINY[name], seed)


def decompressed_copy(int4_dir: str, out: Path) -> str:
    """The INT4 checkpoint decompressed by compressed-tensors (PackedQuantizationCompressor.decompress with the
    config's scheme) to float64, without quantization_config: the float model that means exactly the INT4 one."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.loads((Path(int4_dir) / "config.json").read_text())
                                           ["quantization_config"])
    scheme = qc.config_groups["group_0"]

    def decompress(ts: dict, base: str) -> dict:
        part = {k: ts[base + k] for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
                if base + k in ts}
        # float64 scales: the dequantization (q - z) * s is then exact
        part["weight_scale"] = part["weight_scale"].to(torch.float64)
        return {"weight": PackedQuantizationCompressor.decompress(part, scheme)["weight"].to(torch.float64)}

    tensors = packed_rewrite(decompress)

    def config(c: dict) -> dict:
        c.pop("quantization_config", None)
        return c

    return _rewrite(Path(int4_dir), Path(out), tensors, config)
