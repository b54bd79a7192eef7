"""Tiny Qwen3-MoE and DeepSeek-V3 (Kimi K2 / K2.5-shaped) checkpoints with INT4 experts written by compressed-tensors'
own code, for tests/engine/test_int4_checkpoint.py and tests/ep/test_ep_int4.py.

transformers builds and saves each model (tests/helpers/nvfp4_checkpoints.save_tiny, float64); `int4_checkpoint`
then quantizes every routed expert's gate_proj / up_proj / down_proj the way llm-compressor's W4A16 recipe does:
the scale and zero point from compressed-tensors' `calculate_qparams` over each group's min / max, and the packed
tensors from its `PackedQuantizationCompressor.compress` (`weight_packed` int32 [N, K/8], `weight_scale` [N, K/G],
`weight_shape`, and `weight_zero_point` int32 [N/8, K/G] when asymmetric), with config.json's quantization_config
from its `QuantizationConfig.model_dump()` (quant_method compressed-tensors, format pack-quantized), as Kimi K2
Thinking ships (group 32, symmetric, everything but the routed experts ignored). `scope="all"` quantizes the
attention, dense and shared MLPs too (as community W4A16 releases of Qwen3-MoE do). `decompressed_copy` is the float64
checkpoint holding exactly what the INT4 one means, made by the same library's `decompress` (the oracle's weights);
`gptq_checkpoint` / `awq_checkpoint` rewrite the same integers in GPTQ's and AWQ's own layouts.
`kimi_k25_checkpoint` wraps a DeepSeek-V3 one as Kimi K2.5 publishes it (KimiK25ForConditionalGeneration,
`language_model.model.*`, `language_model.lm_head.weight`, a vision tower's tensors beside them).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from . import nvfp4_checkpoints
from .nvfp4_checkpoints import _rewrite

# Every reduction dim a multiple of the group (32): hidden 64, expert width 32, o_proj's input 64 / 32.
INT4_TINY: dict[str, tuple[str, str, dict]] = {
    "qwen3": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=32, intermediate_size=64, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=True)),
    "dsv3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=32,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=2.5)),
}


def save_tiny(out: Path, name: str, seed: int = 0) -> str:
    """transformers' own model on INT4_TINY[name] (random norms and correction bias), saved float64 with the tiny
    tokenizer (nvfp4_checkpoints.save_tiny on these shapes)."""
    saved = dict(nvfp4_checkpoints.NVFP4_TINY)
    try:
        nvfp4_checkpoints.NVFP4_TINY.update(INT4_TINY)
        return nvfp4_checkpoints.save_tiny(out, name, seed)
    finally:
        nvfp4_checkpoints.NVFP4_TINY.clear()
        nvfp4_checkpoints.NVFP4_TINY.update(saved)

_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
_LINEAR = re.compile(r"\.(q|k|v|o|q_a|q_b|kv_b|gate|up|down)_proj\.weight$|\.kv_a_proj_with_mqa\.weight$")
# Kimi K2 Thinking's ignore list (everything but the routed experts stays bf16), by regex as it publishes it.
KIMI_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]


def _scheme(symmetric: bool, group: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, group_size=group, strategy="group")
    return QuantizationScheme(targets=["Linear"], weights=args)


def compress_weight(w: torch.Tensor, symmetric: bool = True, group: int = 32, scale_dtype=torch.float32) -> dict:
    """One [N, K] weight through compressed-tensors: qparams per group from its min / max (calculate_qparams), then
    PackedQuantizationCompressor.compress. Scales are rounded to bf16 (Kimi's are bf16) and held in `scale_dtype`:
    float32 by default, so transformers' decompression ((q - z) * s in the scale's dtype: at most 13 significant
    bits) is exact and the oracle sees exactly the weights the checkpoint means; bf16 as Kimi ships them."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = _scheme(symmetric, group)
    n, k = w.shape
    g = w.to(torch.float32).reshape(n, k // group, group)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights)
    scale = scale.to(torch.bfloat16).to(scale_dtype)
    state = {"weight": w.to(scale_dtype), "weight_scale": scale, "weight_zero_point": zp}
    return PackedQuantizationCompressor.compress(state, scheme)


def quantization_config(symmetric: bool, group: int, ignore: list[str]) -> dict:
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    qc = QuantizationConfig(config_groups={"group_0": _scheme(symmetric, group)}, ignore=ignore,
                            format=CompressionFormat.pack_quantized.value,
                            quantization_status=QuantizationStatus.COMPRESSED)
    return qc.model_dump(mode="json")


def int4_checkpoint(src: str, out: Path, symmetric: bool = True, group: int = 32, scope: str = "experts",
                    scale_dtype=torch.float32) -> str:
    """`src` with its routed experts (scope "experts", Kimi's recipe) or every projection (scope "all"; the router,
    embeddings and lm_head stay float) in compressed-tensors' pack-quantized W4A16 layout."""
    pattern = _EXPERT if scope == "experts" else _LINEAR
    ignore = KIMI_IGNORE if scope == "experts" else ["lm_head", r"re:.*mlp\.gate$"]

    def tensors(ts: dict) -> dict:
        new = {}
        for name, t in ts.items():
            if not pattern.search(name):
                new[name] = t
                continue
            base = name[: -len("weight")]
            new.update({base + k: v for k, v in compress_weight(t, symmetric, group, scale_dtype).items()})
        return new

    def config(c: dict) -> dict:
        c["quantization_config"] = quantization_config(symmetric, group, ignore)
        return c

    return _rewrite(Path(src), Path(out), tensors, config)


def decompressed_copy(int4_dir: str, out: Path) -> str:
    """The INT4 checkpoint decompressed by compressed-tensors (PackedQuantizationCompressor.decompress with the
    config's scheme) to float64, without quantization_config: the float model that means exactly the INT4 one."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.loads((Path(int4_dir) / "config.json").read_text())
                                           ["quantization_config"])
    scheme = qc.config_groups["group_0"]

    def tensors(ts: dict) -> dict:
        new = {}
        for name, t in ts.items():
            if name.endswith((".weight_scale", ".weight_shape", ".weight_zero_point")):
                continue
            if name.endswith(".weight_packed"):
                base = name[: -len("weight_packed")]
                part = {k: ts[base + k] for k in ("weight_packed", "weight_scale", "weight_shape",
                                                  "weight_zero_point") if base + k in ts}
                # float64 scales: the dequantization (q - z) * s is then exact
                part["weight_scale"] = part["weight_scale"].to(torch.float64)
                new[base + "weight"] = PackedQuantizationCompressor.decompress(part, scheme)["weight"].to(torch.float64)
                continue
            new[name] = t
        return new

    def config(c: dict) -> dict:
        c.pop("quantization_config", None)
        return c

    return _rewrite(Path(int4_dir), Path(out), tensors, config)


def _nibbles(ts: dict, base: str, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u [N, K] the stored nibbles 0..15, zero points [N, K/G] 0..15, scales [N, K/G]) of one compressed weight."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(ts[base + "weight_shape"].tolist())
    s = ts[base + "weight_scale"]
    u = unpack_from_int32(ts[base + "weight_packed"], 4, shape).to(torch.int32) + 8
    if symmetric:
        z = torch.full(s.shape, 8, dtype=torch.int32)
    else:
        z = unpack_from_int32(ts[base + "weight_zero_point"], 4, (shape[0], s.shape[1]), packed_dim=0).to(torch.int32) + 8
    return u, z, s


def _pack_k(u_KN: torch.Tensor) -> torch.Tensor:
    """[K, N] nibbles -> int32 [K/8, N], 8 consecutive K values per word, value 8r+j at bits 4j (GPTQ's qweight)."""
    k, n = u_KN.shape
    v = u_KN.reshape(k // 8, 8, n).to(torch.int64)
    word = sum(v[:, j] << (4 * j) for j in range(8))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _pack_n(u_KN: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[K, N] nibbles -> int32 [K, N/8] packed along N (GPTQ's qzeros; AWQ's with order [0, 2, 4, 6, 1, 3, 5, 7]):
    slot j of word w holds column 8w + order[j]."""
    k, n = u_KN.shape
    v = u_KN.reshape(k, n // 8, 8).to(torch.int64)
    word = sum(v[:, :, order[j]] << (4 * j) for j in range(8))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def gptq_checkpoint(int4_dir: str, out: Path, symmetric: bool, group: int, v1: bool = True) -> str:
    """The same integers in GPTQ's layout (AutoGPTQ / GPTQModel): qweight int32 [K/8, N], qzeros int32 [K/G, N/8]
    (checkpoint_format "gptq", v1: stored as zero - 1), scales float16 [K/G, N], g_idx [K] = k // G."""
    def tensors(ts: dict) -> dict:
        new = {}
        for name, t in ts.items():
            if name.endswith((".weight_scale", ".weight_shape", ".weight_zero_point")):
                continue
            if name.endswith(".weight_packed"):
                base = name[: -len("weight_packed")]
                u, z, s = _nibbles(ts, base, symmetric)
                k = u.shape[1]
                new[base + "qweight"] = _pack_k(u.T.contiguous())
                new[base + "qzeros"] = _pack_n((z - 1 if v1 else z).T.contiguous())
                new[base + "scales"] = s.T.contiguous().to(torch.float16)
                new[base + "g_idx"] = torch.arange(k, dtype=torch.int32) // group
                continue
            new[name] = t
        return new

    def config(c: dict) -> dict:
        c["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                    "sym": symmetric, "checkpoint_format": "gptq" if v1 else "gptq_v2",
                                    "lm_head": False, "modules_in_block_to_quantize": None}
        return c

    return _rewrite(Path(int4_dir), Path(out), tensors, config)


def awq_checkpoint(int4_dir: str, out: Path, symmetric: bool, group: int) -> str:
    """The same integers in AutoAWQ's GEMM layout: qweight int32 [K, N/8] and qzeros int32 [K/G, N/8], both packed
    along N in AWQ's order, scales float16 [K/G, N]."""
    def tensors(ts: dict) -> dict:
        new = {}
        for name, t in ts.items():
            if name.endswith((".weight_scale", ".weight_shape", ".weight_zero_point")):
                continue
            if name.endswith(".weight_packed"):
                base = name[: -len("weight_packed")]
                u, z, s = _nibbles(ts, base, symmetric)
                new[base + "qweight"] = _pack_n(u.T.contiguous(), AWQ_ORDER)
                new[base + "qzeros"] = _pack_n(z.T.contiguous(), AWQ_ORDER)
                new[base + "scales"] = s.T.contiguous().to(torch.float16)
                continue
            new[name] = t
        return new

    def config(c: dict) -> dict:
        c["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                    "version": "gemm", "modules_to_not_convert": None}
        return c

    return _rewrite(Path(int4_dir), Path(out), tensors, config)


def kimi_k25_checkpoint(dsv3_dir: str, out: Path) -> str:
    """A DeepSeek-V3-shaped checkpoint as Kimi K2.5 publishes its multimodal one: config.json's architectures
    [KimiK25ForConditionalGeneration], model_type kimi_k25, the text model's config under text_config (model_type
    kimi_k2) and the quantization at the top level; the text model's tensors under `language_model.model.` and its
    head as `language_model.lm_head.weight`, with a vision tower's and projector's tensors beside them."""
    def tensors(ts: dict) -> dict:
        new = {}
        for name, t in ts.items():
            if name.startswith("model."):
                new["language_model." + name] = t
            elif name.startswith("lm_head."):
                new["language_model." + name] = t
            else:
                new[name] = t
        g = torch.Generator().manual_seed(5)
        new["vision_tower.encoder.blocks.0.wqkv.weight"] = torch.randn(24, 8, generator=g, dtype=torch.bfloat16)
        new["vision_tower.patch_embed.proj.weight"] = torch.randn(8, 3, 2, 2, generator=g, dtype=torch.bfloat16)
        new["mm_projector.proj.0.weight"] = torch.randn(16, 32, generator=g, dtype=torch.bfloat16)
        return new

    def config(c: dict) -> dict:
        quant = c.pop("quantization_config", None)
        text = {**c, "model_type": "kimi_k2"}
        text.pop("architectures", None)
        top = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25", "text_config": text,
               "vision_config": {"model_type": "kimi_k25_vision"}, "media_placeholder_token_id": 3,
               "tie_word_embeddings": False}
        if quant is not None:
            top["quantization_config"] = quant
        return top

    return _rewrite(Path(dsv3_dir), Path(out), tensors, config)
