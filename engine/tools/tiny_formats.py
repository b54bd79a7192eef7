"""A float checkpoint rewritten in a quantized format as its publishers write it, with the format's own library or
rules: the quantized tiny checkpoints of `moelink make-tiny-model --format` and of the tests.

- INT4 W4A16 (`int4_checkpoint`): every routed expert's gate / up / down (scope "experts", Kimi K2 Thinking's
  recipe), or every projection (scope "all", as community W4A16 releases of Qwen3-MoE do), quantized the way
  llm-compressor's W4A16 recipe does: scale and zero point from compressed-tensors' `calculate_qparams` over each
  group's min / max, the packed tensors from its `PackedQuantizationCompressor.compress` (`weight_packed` int32
  [N, K/8], `weight_scale` [N, K/G], `weight_shape`, and `weight_zero_point` int32 [N/8, K/G] when asymmetric), and
  config.json's quantization_config from its `QuantizationConfig.model_dump()` (compressed-tensors,
  pack-quantized). `gptq_checkpoint` / `awq_checkpoint` rewrite the same integers in GPTQ's and AutoAWQ's layouts.
- NVFP4 (`nvfp4_checkpoint`): ModelOpt's export (`weight` uint8 [N, K/2] e2m1 pairs, `weight_scale` float8_e4m3fn
  [N, K/16], `weight_scale_2` and `input_scale` float32 scalars; gate and up quantized apart), the quantization in
  config.json or in hf_quant_config.json.
- FP8 block-scaled and gpt-oss's MXFP4 have tools of their own: quantize_fp8.py and mxfp4_checkpoint.py.
A family's own formats and wrappers live in its package (engine/models/<family>/tiny.py, `TinyArch.own_formats` and
`wrap`): DeepSeek-V4 as published (its family's tiny.py, the "published" format), Kimi K2.5's multimodal wrapper of a
DeepSeek-V3 checkpoint (deepseek/tiny.py: `kimi_k25_checkpoint`).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..config.quantization_int4 import compress_weight, int4_scheme
from .file_modes import umask_mode


def rewrite_checkpoint(src: Path, out: Path, tensors_fn, config_fn) -> str:
    """Copy checkpoint `src` to `out` with each safetensors file's tensors mapped by tensors_fn and config.json by
    config_fn (the index's weight map follows the tensors)."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    where: dict[str, str] = {}
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = tensors_fn(load_file(str(f)))
            save_file(tensors, str(out / f.name), metadata={"format": "pt"})
            umask_mode([out / f.name])
            where.update({k: f.name for k in tensors})
        elif f.is_file() and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    if (src / "model.safetensors.index.json").is_file():
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": where}))
    (out / "config.json").write_text(json.dumps(config_fn(json.loads((src / "config.json").read_text()))))
    return str(out)


# FP8 block-scaled (quantize_fp8.py) at tiny sizes: 16 x 16 blocks, so a 32-64 wide linear spans several.
FP8_BLOCK = (16, 16)

# Routed experts per expert, as the families name them (mlp.experts.{e}.gate_proj / up_proj / down_proj; Mixtral's
# and MiniMax-M2's block_sparse_moe.experts.{e}.w1 / w3 / w2).
EXPERT = re.compile(r"\.(mlp|block_sparse_moe)\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
# scope "all": every projection W4A16 / ModelOpt's default NVFP4 recipe quantizes (not the router, embeddings or
# lm_head)
LINEAR = re.compile(r"\.(q|k|v|o|q_a|q_b|kv_b|gate|up|down)_proj\.weight$|\.kv_a_proj_with_mqa\.weight$")

# -- INT4 W4A16 ------------------------------------------------------------------------------------------------------

# Kimi K2 Thinking's ignore list (everything but the routed experts stays bf16), by regex as it publishes it.
KIMI_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]
INT4_GROUPS = (32, 64, 128)


def quantization_config(symmetric: bool, group: int, ignore: list[str]) -> dict:
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    qc = QuantizationConfig(config_groups={"group_0": int4_scheme(symmetric, group)}, ignore=ignore,
                            format=CompressionFormat.pack_quantized.value,
                            quantization_status=QuantizationStatus.COMPRESSED)
    return qc.model_dump(mode="json")


def int4_checkpoint(src: str, out: Path, symmetric: bool = True, group: int = 32, scope: str = "experts",
                    scale_dtype=torch.float32) -> str:
    """`src` with its routed experts (scope "experts", Kimi's recipe) or every projection (scope "all"; the router,
    embeddings and lm_head stay float) in compressed-tensors' pack-quantized W4A16 layout."""
    pattern = EXPERT if scope == "experts" else LINEAR
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

    return rewrite_checkpoint(Path(src), Path(out), tensors, config)


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


def pack_k(u_KN: torch.Tensor) -> torch.Tensor:
    """[K, N] nibbles -> int32 [K/8, N], 8 consecutive K values per word, value 8r+j at bits 4j (GPTQ's qweight)."""
    k, n = u_KN.shape
    v = u_KN.reshape(k // 8, 8, n).to(torch.int64)
    word = sum(v[:, j] << (4 * j) for j in range(8))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def pack_n(u_KN: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[K, N] nibbles -> int32 [K, N/8] packed along N (GPTQ's qzeros; AWQ's with order [0, 2, 4, 6, 1, 3, 5, 7]):
    slot j of word w holds column 8w + order[j]."""
    k, n = u_KN.shape
    v = u_KN.reshape(k, n // 8, 8).to(torch.int64)
    word = sum(v[:, :, order[j]] << (4 * j) for j in range(8))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_PACKED_PARTS = (".weight_scale", ".weight_shape", ".weight_zero_point")  # what a compressed-tensors linear carries


def packed_rewrite(convert):
    """A tensors rewrite (for `rewrite_checkpoint`) that replaces each compressed-tensors INT4 linear (its
    weight_packed and the parts beside it) by `convert(tensors, base)`'s tensors, named base + key; every other
    tensor is kept as it is."""
    def tensors(ts: dict) -> dict:
        new = {}
        for name, t in ts.items():
            if name.endswith(_PACKED_PARTS):
                continue
            if name.endswith(".weight_packed"):
                base = name[: -len("weight_packed")]
                new.update({base + k: v for k, v in convert(ts, base).items()})
                continue
            new[name] = t
        return new

    return tensors


def gptq_checkpoint(int4_dir: str, out: Path, symmetric: bool, group: int, v1: bool = True) -> str:
    """The same integers in GPTQ's layout (AutoGPTQ / GPTQModel): qweight int32 [K/8, N], qzeros int32 [K/G, N/8]
    (checkpoint_format "gptq", v1: stored as zero - 1), scales float16 [K/G, N], g_idx [K] = k // G."""
    def gptq(ts: dict, base: str) -> dict:
        u, z, s = _nibbles(ts, base, symmetric)
        return {"qweight": pack_k(u.T.contiguous()), "qzeros": pack_n((z - 1 if v1 else z).T.contiguous()),
                "scales": s.T.contiguous().to(torch.float16),
                "g_idx": torch.arange(u.shape[1], dtype=torch.int32) // group}

    tensors = packed_rewrite(gptq)

    def config(c: dict) -> dict:
        c["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                    "sym": symmetric, "checkpoint_format": "gptq" if v1 else "gptq_v2",
                                    "lm_head": False, "modules_in_block_to_quantize": None}
        return c

    return rewrite_checkpoint(Path(int4_dir), Path(out), tensors, config)


def awq_checkpoint(int4_dir: str, out: Path, symmetric: bool, group: int) -> str:
    """The same integers in AutoAWQ's GEMM layout: qweight int32 [K, N/8] and qzeros int32 [K/G, N/8], both packed
    along N in AWQ's order, scales float16 [K/G, N] (AWQ has zero points: from an asymmetric checkpoint, or the
    symmetric one's 8)."""
    def awq(ts: dict, base: str) -> dict:
        u, z, s = _nibbles(ts, base, symmetric)
        return {"qweight": pack_n(u.T.contiguous(), AWQ_ORDER), "qzeros": pack_n(z.T.contiguous(), AWQ_ORDER),
                "scales": s.T.contiguous().to(torch.float16)}

    tensors = packed_rewrite(awq)

    def config(c: dict) -> dict:
        c["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                    "version": "gemm", "modules_to_not_convert": None}
        return c

    return rewrite_checkpoint(Path(int4_dir), Path(out), tensors, config)


# -- NVFP4 (ModelOpt) ------------------------------------------------------------------------------------------------

# ModelOpt's exclusions as its FP4 releases write them: the attention, the router and lm_head stay bf16.
NVFP4_IGNORE = ["lm_head", "model.layers.*.self_attn*", "model.layers.*.mlp.gate"]


def nvfp4_checkpoint(src: str, out: Path, hf_quant_file: bool = False, scope: str = "experts") -> str:
    """`src` with its routed experts (scope "experts"), or every projection (scope "all": attention, dense and
    shared MLPs too, as ModelOpt's default recipe does), in ModelOpt's NVFP4 layout; the quantization in
    config.json's quantization_config (`ignore`), or with `hf_quant_file` in hf_quant_config.json
    (`exclude_modules`), as ModelOpt's older exports have it."""
    from moelink.kernels.nvfp4 import nvfp4_quantize

    pattern = EXPERT if scope == "experts" else LINEAR
    ignore = NVFP4_IGNORE if scope == "experts" else ["lm_head", "model.layers.*.mlp.gate"]

    def tensors(ts: dict) -> dict:
        new = {}
        for name, t in ts.items():
            if not pattern.search(name):
                new[name] = t
                continue
            q, s, g = nvfp4_quantize(t)
            base = name[: -len("weight")]
            new.update({base + "weight": q, base + "weight_scale": s, base + "weight_scale_2": g.reshape(()),
                        base + "input_scale": torch.tensor(0.5, dtype=torch.float32)})
        return new

    def config(c: dict) -> dict:
        if not hf_quant_file:
            c["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                                        "kv_cache_quant_algo": None, "ignore": ignore}
        return c

    path = rewrite_checkpoint(Path(src), Path(out), tensors, config)
    if hf_quant_file:
        (Path(out) / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.29.0"},
            "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                             "exclude_modules": ignore}}))
    return path


__all__ = ["AWQ_ORDER", "EXPERT", "FP8_BLOCK", "INT4_GROUPS", "KIMI_IGNORE", "LINEAR", "NVFP4_IGNORE", "awq_checkpoint",
           "compress_weight", "gptq_checkpoint", "int4_checkpoint", "int4_scheme", "nvfp4_checkpoint", "pack_k",
           "pack_n", "quantization_config", "rewrite_checkpoint"]
