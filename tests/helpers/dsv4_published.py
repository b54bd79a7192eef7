"""A tiny DeepSeek-V4 checkpoint in the format DeepSeek publishes V4-Flash / V4-Pro in, and its float oracle (the writer
lives in engine/models/deepseek_v4/tiny.py, what `moelink make-tiny-model --arch deepseek_v4 --format published`
writes).

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

import torch

from moelink.engine.models.deepseek_v4.tiny import DSV4_FP8_LINEARS as FP8_LINEARS  # noqa: F401
from moelink.engine.models.deepseek_v4.tiny import DSV4_HF_FP8_LINEARS as HF_FP8_LINEARS
from moelink.engine.models.deepseek_v4.tiny import dsv4_published_name as published  # noqa: F401
from moelink.engine.models.deepseek_v4.tiny import E4M3_MAX, fp4_experts, fp8_ue8m0, write_published_dsv4  # noqa: F401


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
