"""DeepSeek-V4.1's tiny checkpoint (tests/fixtures/deepseek_v41/tiny) rewritten in DeepSeek's published FP8 format,
by the rules of DeepSeek's inference code as moelink reads V4 (tests/helpers/dsv4_published.py: ue8m0 block scales,
2^ceil(log2(amax / 448)), e4m3 = round(w / scale)), and its dequantized twin (every quantized weight replaced by its
dequantized value, exact in float64, under transformers' names): what tests/fixtures/deepseek_v41/make_fixtures.py
serves to transformers' main-branch V4.1 for the published reference, and what tests/engine/test_deepseek_v41.py
serves to moelink.

Published: names without `model.` (`embed.weight`, `layers.{i}....`, `norm.weight`, `head.weight`); the composite
config.json (`model_type` deepseek_v41, `text_config`, `quantization_config` at the top with `expert_dtype` fp8);
FP8 (`X.weight` float8_e4m3fn + `X.scale` float8_e8m0fnu per `block`): attention's wq_a, wq_b, wkv, wo_a, wo_b, the
indexer's wq_b, the shared expert's w1 / w2 / w3 and, with `expert_dtype` "fp8", the routed experts'; with "fp4" (as
V4.1-Flash ships them) the routed experts e2m1 packed two a byte along K, the low nibble the even element (int8
[N, K/2]), `X.scale` float8_e8m0fnu [N, K/32] (kernels/mxfp4.mxfp4_quantize's rounding); the Engram tables FP8 with
one ue8m0 scale per row per 32 values (`engram.embed.scale`). The rest stays float.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FP8_LINEARS = (".attn.wq_a.", ".attn.wq_b.", ".attn.wkv.", ".attn.wo_a.", ".attn.wo_b.", ".attn.indexer.wq_b.",
               ".ffn.shared_experts.", ".ffn.experts.")
HF_W8A8 = (".ffn.shared_experts.w1", ".ffn.shared_experts.w2", ".ffn.shared_experts.w3")  # moelink runs them W8A8
BLOCK = (16, 16)
E4M3_MAX = 448.0


def _fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float8_e8m0fnu scales per block, the dequantized float64 weight)."""
    bn, bk = block
    n, k = w.shape
    nb, kb = -(-n // bn), -(-k // bk)
    w64 = w.to(torch.float64)
    padded = torch.nn.functional.pad(w64, (0, kb * bk - k, 0, nb * bn - n))
    amax = padded.reshape(nb, bn, kb, bk).abs().amax(dim=(1, 3)).clamp(min=1e-10)
    scale = torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX)))
    full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    q = (w64 / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float32).to(torch.float8_e8m0fnu), q.to(torch.float64) * full


def published_name(name: str) -> str:
    return "head.weight" if name == "lm_head.weight" else name.removeprefix("model.")


def _fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 [N, K/2] packed e2m1, float8_e8m0fnu [N, K/32] scales, the dequantized float64 weight)."""
    from moelink.kernels.mxfp4 import mxfp4_dequantize, mxfp4_quantize

    blocks, scales = mxfp4_quantize(w)
    return (blocks.reshape(w.shape[0], -1).view(torch.int8), scales.view(torch.float8_e8m0fnu),
            mxfp4_dequantize(blocks, scales, torch.float64))


def write_published(float_dir: Path, out_dir: Path, twin_dir: Path, block: tuple[int, int] = BLOCK,
                    expert_dtype: str = "fp8") -> None:
    """`out_dir`: the published format of `float_dir`; `twin_dir`: its dequantized twin (module docstring)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(Path(float_dir) / "model.safetensors"))
    out, twin = {}, {}
    for name, t in tensors.items():
        pub = published_name(name)
        if name.endswith(".engram.embed.scale"):
            continue  # written with its table below
        if name.endswith(".engram.embed.weight"):
            q, s, deq = _fp8(t, (1, 32))
        elif expert_dtype == "fp4" and ".ffn.experts." in name and name.endswith(".weight"):
            q, s, deq = _fp4(t)
        elif name.endswith(".weight") and any(k in name for k in FP8_LINEARS):
            q, s, deq = _fp8(t, block)
        else:
            out[pub], twin[name] = t, t
            continue
        out[pub], out[pub[: -len("weight")] + "scale"], twin[name] = q, s, deq.to(t.dtype)
        if name.endswith(".engram.embed.weight"):
            twin[name[: -len("weight")] + "scale"] = tensors[name[: -len("weight")] + "scale"]
    for d, ts in ((Path(out_dir), out), (Path(twin_dir), twin)):
        shutil.copytree(float_dir, d, dirs_exist_ok=True)
        save_file(ts, str(d / "model.safetensors"), metadata={"format": "pt"})
    text = json.loads((Path(float_dir) / "config.json").read_text())
    text.pop("architectures", None)
    raw = {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41", "text_config": text,
           "vision_config": {"num_hidden_layers": 1},
           "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                   "scale_fmt": "ue8m0", "weight_block_size": list(block), "expert_dtype": expert_dtype}}
    (Path(out_dir) / "config.json").write_text(json.dumps(raw, indent=2))


__all__ = ["BLOCK", "FP8_LINEARS", "HF_W8A8", "published_name", "write_published"]
