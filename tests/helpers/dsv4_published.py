"""A tiny DeepSeek-V4 checkpoint in the format DeepSeek publishes V4-Flash / V4-Pro in, and its float oracle.

From the float checkpoint transformers saved (tests/helpers/dsv4_checkpoint.py), with the format's own rules (those of
DeepSeek's inference code: `act_quant` / `fp4_act_quant` with ue8m0 scales, and its convert.py's e2m1 table):
- names as published: no `model.` prefix, `embed.weight`, `hc_head_fn` / `_base` / `_scale`, `attn.kv_norm.weight`
  (transformers saves `attn.norm.weight`; DeepSeek's headers say kv_norm), per-expert
  `layers.{i}.ffn.experts.{e}.w{1,2,3}.weight`;
- FP8 linears (attention's wq_a, wq_b, wkv, wo_a, wo_b, the indexer's wq_b, the shared expert's w1 / w2 / w3, an MTP
  layer's e_proj / h_proj):
  float8_e4m3fn `X.weight` and `X.scale` float8_e8m0fnu, one per `block`: scale = 2 ** ceil(log2(amax / 448)) (ue8m0
  rounds the scale up, so no value saturates), e4m3 = round(w / scale);
- FP4 routed experts (`expert_dtype: "fp4"`): e2m1 pairs a byte along K, the low nibble the even element, as int8
  [N, K/2], `X.scale` float8_e8m0fnu [N, K/32] = 2 ** ceil(log2(amax / 6)) per 32 values; values rounded to the
  nearest e2m1 (kernels/mxfp4.mxfp4_quantize: the same scale rule, checked bit for bit against transformers'
  MXFP4 reader in tests/kernels/test_mxfp4.py). `expert_dtype="fp8"` writes the experts as FP8 linears instead;
- config.json: `quantization_config = {quant_method fp8, fmt e4m3, activation_scheme dynamic, scale_fmt ue8m0,
  weight_block_size}` and a top-level `expert_dtype` (V4's spelling; transformers moves it into the
  quantization_config).
The tensors that stay float (compressors, indexer weights_proj, gate, norms, hyper-connections, embed, head) keep the
float checkpoint's float64 (published: bf16): only the quantized formats are under test.

The oracle is the float checkpoint with every quantized weight replaced by its dequantized value (exact in float64),
saved by name as transformers saved it: transformers runs it (`fake_quant_dsv4`: with the W8A8 activation rounding at
the inputs of the FP8 linears, which moelink runs FP8), and moelink must give its tokens exactly.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moelink.kernels.mxfp4 import mxfp4_dequantize, mxfp4_quantize

# transformers' modules of the FP8 linears (DeepseekV4ForCausalLM's names; the compressors' kv_proj / gate_proj and the
# indexer's weights_proj ship in bf16 and stay float)
HF_FP8_LINEARS = (".self_attn.q_a_proj", ".self_attn.q_b_proj", ".self_attn.kv_proj", ".self_attn.o_a_proj",
                  ".self_attn.o_b_proj", ".indexer.q_b_proj", ".shared_experts.gate_proj", ".shared_experts.up_proj",
                  ".shared_experts.down_proj")
FP8_LINEARS = (".attn.wq_a.", ".attn.wq_b.", ".attn.wkv.", ".attn.wo_a.", ".attn.wo_b.", ".attn.indexer.wq_b.",
               ".ffn.shared_experts.", ".e_proj.", ".h_proj.")
E4M3_MAX = 448.0


def published(name: str) -> str:
    """The name DeepSeek's files give a tensor save_pretrained calls `name` (transformers' conversion mapping)."""
    special = {"model.embed_tokens.weight": "embed.weight", "model.hc_head.hc_fn": "hc_head_fn",
               "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale"}
    return special.get(name, name.removeprefix("model.").replace(".attn.norm.weight", ".attn.kv_norm.weight"))


def fp8_ue8m0(w_NK: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float8_e8m0fnu scales [ceil(N/Bn), ceil(K/Bk)], the dequantized float64 weight)."""
    bn, bk = block
    n, k = w_NK.shape
    nb, kb = -(-n // bn), -(-k // bk)
    w = w_NK.to(torch.float64)
    padded = torch.nn.functional.pad(w, (0, kb * bk - k, 0, nb * bn - n))
    amax = padded.reshape(nb, bn, kb, bk).abs().amax(dim=(1, 3)).clamp(min=1e-10)
    scale = torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX)))  # a power of two: exact in e8m0
    full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    wq = (w / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return wq, scale.to(torch.float32).to(torch.float8_e8m0fnu), wq.to(torch.float64) * full


def fp4_experts(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 [N, K/2] packed e2m1, float8_e8m0fnu [N, K/32] scales, the dequantized float64 weight)."""
    blocks_NSQ, scales_NS = mxfp4_quantize(w_NK)
    n = w_NK.shape[0]
    return (blocks_NSQ.reshape(n, -1).view(torch.int8), scales_NS.view(torch.float8_e8m0fnu),
            mxfp4_dequantize(blocks_NSQ, scales_NS, torch.float64))


def write_published_dsv4(float_dir: str, out_dir: Path, oracle_dir: Path, block: tuple[int, int] = (16, 16),
                         expert_dtype: str = "fp4") -> tuple[str, str]:
    """Write `out_dir` (the published format) and `oracle_dir` (its dequantized float twin); returns both paths."""
    src = Path(float_dir)
    (st_file,) = src.glob("*.safetensors")
    tensors = load_file(str(st_file))
    out, oracle = {}, {}
    for name, t in tensors.items():
        pub = published(name)
        if ".experts." in name and ".shared_experts." not in name and name.endswith(".weight"):
            kind = expert_dtype
        elif any(s in name for s in FP8_LINEARS) and name.endswith(".weight"):
            kind = "fp8"
        else:
            out[pub], oracle[name] = t, t
            continue
        if kind == "fp4":
            q, s, deq = fp4_experts(t)
        else:
            q, s, deq = fp8_ue8m0(t, block)
        out[pub], out[pub[: -len("weight")] + "scale"], oracle[name] = q, s, deq.to(t.dtype)
    for d in (out_dir, oracle_dir):
        shutil.copytree(src, d)
        (Path(d) / st_file.name).unlink()
    save_file(out, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})
    save_file(oracle, str(Path(oracle_dir) / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((Path(out_dir) / "config.json").read_text())
    raw["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "scale_fmt": "ue8m0", "weight_block_size": list(block)}
    if expert_dtype == "fp4":
        raw["expert_dtype"] = "fp4"
    (Path(out_dir) / "config.json").write_text(json.dumps(raw, indent=2))
    return str(out_dir), str(oracle_dir)


def fake_quant_dsv4(oracle_dir: str, block: tuple[int, int]):
    """transformers' float64 model of `oracle_dir` (write_published_dsv4's dequantized twin) with the W8A8 activation
    rounding moelink's FP8 linears apply (kernels/fp8.fake_quant_activation, per token per Bk channels) at the input
    of each one: attention's wq_a / wq_b / wkv / wo_b, wo_a per group (its input [.., G, d]: each group's d channels),
    the indexer's wq_b and the shared expert's w1 / w3 / w2. The routed experts (FP4, W4A16) keep float inputs."""
    from transformers import AutoModelForCausalLM

    from moelink.kernels.fp8 import fake_quant_activation

    bk = block[1]

    def fq(module, args):
        x = args[0]
        return (fake_quant_activation(x.reshape(-1, x.shape[-1]), bk).to(x.dtype).view_as(x),) + tuple(args[1:])

    model = AutoModelForCausalLM.from_pretrained(oracle_dir, dtype=torch.float64, experts_implementation="eager").eval()
    hooked = [mod.register_forward_pre_hook(fq) for name, mod in model.named_modules() if name.endswith(HF_FP8_LINEARS)]
    # 8 a layer (5 of attention, 3 of the shared expert), + the indexer's on CSA layers
    assert len(hooked) >= 8 * len(model.model.layers), "transformers renamed V4's linears: some rounding is not hooked"
    return model
