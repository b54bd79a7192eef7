"""Kimi K3's tiny checkpoint: `moelink make-tiny-model --arch kimi_k3` and the test suite's (tests/engine/
test_kimi_k3.py). transformers has no Kimi K3 model, so the weights are drawn here (seeded: same seed, same bytes)
and written as Moonshot publishes K3: config.json's KimiK3ForConditionalGeneration wrapper (model_type kimi_k3, the
text model's fields under text_config, model_type kimi_linear) and the text model's tensors under
language_model.model. / language_model.lm_head, K3's names (block_sparse_moe.experts.{e}.w1/w3/w2, the latent
projections, the attention-residual projections and norms). No vision tower is written (moelink does not read it).

Six layers: KDA (4 heads of 16, a 4-wide convolution, the full-rank output gate, the bounded forget gate) on 0, 1,
3, 4, NoPE MLA (q LoRA 16, latent 16, the element-wise output gate) on 2 and 5; a dense first layer; 8 experts,
top-2, the correction bias, a latent of 16 (hidden 32) with its norm, two shared experts; attention-residual blocks
of 2 layers; SiTU with constants its tanh reaches on these weights (beta 1.5, linear_beta 0.75: K3's own are 4 and
25). The oracle of its tests is tests/fixtures/kimi_k3/make_reference.py on this checkpoint.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import torch

from ...tools.file_modes import umask_mode
from ...tools.tiny_families import MAX_POS, VOCAB, TinyArch, published_as, save_tokenizer

K3_TINY = dict(
    vocab_size=VOCAB, max_position_embeddings=MAX_POS, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=8, mla_use_nope=True, mla_use_output_gate=True,
    linear_attn_config=dict(kda_layers=[1, 2, 4, 5], full_attn_layers=[3, 6], num_heads=4, head_dim=16,
                            short_conv_kernel_size=4, gate_lower_bound=-5.0, use_full_rank_gate=True),
    num_experts=8, num_experts_per_token=2, num_shared_experts=2, moe_intermediate_size=16,
    routed_expert_hidden_size=16, latent_moe_use_norm=True, first_k_dense_replace=1, moe_layer_freq=1,
    moe_renormalize=True, moe_router_activation_func="sigmoid", routed_scaling_factor=2.5, num_expert_group=1,
    topk_group=1, topk_method="noaux_tc", use_grouped_topk=True, hidden_act="situ", activation_situ_beta=1.5,
    activation_situ_linear_beta=0.75, attn_res_block_size=2, rms_norm_eps=1e-5, num_nextn_predict_layers=0,
    tie_word_embeddings=False, model_type="kimi_linear", architectures=["KimiLinearForCausalLM"], bos_token_id=None,
    eos_token_id=None, pad_token_id=None,
)


def k3_config(**overrides) -> dict:
    """config.json as Moonshot publishes Kimi K3: the wrapper, the text model's fields (`overrides` on top) inside."""
    text = {**K3_TINY, **overrides}
    return {"architectures": ["KimiK3ForConditionalGeneration"], "model_type": "kimi_k3", "text_config": text,
            "tie_word_embeddings": False, "media_placeholder_token_id": text["vocab_size"] - 1}


def _layer_tensors(t: dict, i: int, text: dict, draw) -> None:
    """Layer i's tensors into `t` (names under "model.layers.{i}.")."""
    D, la = text["hidden_size"], text["linear_attn_config"]
    p = f"model.layers.{i}."
    for name in ("input_layernorm", "post_attention_layernorm", "self_attention_res_norm", "mlp_res_norm"):
        t[p + name + ".weight"] = 1.0 + draw(D, scale=0.1)
    for name in ("self_attention_res_proj", "mlp_res_proj"):
        t[p + name + ".weight"] = draw(1, D, scale=0.4)
    a = p + "self_attn."
    H, K, W = la["num_heads"], la["head_dim"], la["short_conv_kernel_size"]
    if i + 1 in la["kda_layers"]:
        for x in "qkv":
            t[f"{a}{x}_proj.weight"] = draw(H * K, D)
            t[f"{a}{x}_conv1d.weight"] = draw(H * K, 1, W, scale=0.4)
        t[a + "f_a_proj.weight"], t[a + "f_b_proj.weight"] = draw(K, D), draw(H * K, K)
        t[a + "b_proj.weight"], t[a + "g_proj.weight"] = draw(H, D), draw(H * K, D)
        t[a + "A_log"] = torch.log(1.0 + 15.0 * draw(H, scale=1.0).abs().clamp(max=1.0))
        t[a + "dt_bias"] = draw(H * K, scale=0.5)
        t[a + "o_norm.weight"], t[a + "o_proj.weight"] = 1.0 + draw(K, scale=0.1), draw(D, H * K)
    else:
        N, Rq, C = text["num_attention_heads"], text["q_lora_rank"], text["kv_lora_rank"]
        nope, pe, v = text["qk_nope_head_dim"], text["qk_rope_head_dim"], text["v_head_dim"]
        t[a + "q_a_proj.weight"], t[a + "q_a_layernorm.weight"] = draw(Rq, D), 1.0 + draw(Rq, scale=0.1)
        t[a + "q_b_proj.weight"] = draw(N * (nope + pe), Rq)
        t[a + "kv_a_proj_with_mqa.weight"], t[a + "kv_a_layernorm.weight"] = draw(C + pe, D), 1.0 + draw(C, scale=0.1)
        t[a + "kv_b_proj.weight"] = draw(N * (nope + v), C)
        t[a + "g_proj.weight"], t[a + "o_proj.weight"] = draw(N * v, D), draw(D, N * v)
    if i < text["first_k_dense_replace"]:
        F = text["intermediate_size"]
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = draw(F, D), draw(F, D)
        t[p + "mlp.down_proj.weight"] = draw(D, F)
        return
    m, E, L, Im = p + "block_sparse_moe.", text["num_experts"], text["routed_expert_hidden_size"], text[
        "moe_intermediate_size"]
    t[m + "gate.weight"], t[m + "gate.e_score_correction_bias"] = draw(E, D, scale=0.5), draw(E, scale=0.05)
    for e in range(E):
        t[f"{m}experts.{e}.w1.weight"], t[f"{m}experts.{e}.w3.weight"] = draw(Im, L), draw(Im, L)
        t[f"{m}experts.{e}.w2.weight"] = draw(L, Im)
    t[m + "routed_expert_down_proj.weight"], t[m + "routed_expert_up_proj.weight"] = draw(L, D), draw(D, L)
    t[m + "routed_expert_norm.weight"] = 1.0 + draw(L, scale=0.1)
    S = Im * text["num_shared_experts"]
    t[m + "shared_experts.gate_proj.weight"], t[m + "shared_experts.up_proj.weight"] = draw(S, D), draw(S, D)
    t[m + "shared_experts.down_proj.weight"] = draw(D, S)


def k3_tensors(text: Mapping, seed: int = 0) -> dict[str, torch.Tensor]:
    """The text model's tensors (float64, names as the text model has them: "model.*", "lm_head.weight"), drawn
    from `seed`: linears N(0, 1/fan_in) so the activations keep their scale through the layers, norms 1 + N(0, 0.1),
    the attention-residual projections N(0, 0.4) (their softmax then far from uniform)."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape: int, scale: float | None = None) -> torch.Tensor:
        s = scale if scale is not None else 1.0 / math.sqrt(shape[-1])
        return torch.randn(shape, generator=g, dtype=torch.float64) * s

    D, V = text["hidden_size"], text["vocab_size"]
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": draw(V, D, scale=1.0)}
    for i in range(text["num_hidden_layers"]):
        _layer_tensors(t, i, dict(text), draw)
    t["model.norm.weight"], t["model.output_attn_res_norm.weight"] = 1.0 + draw(D, scale=0.1), 1.0 + draw(D, scale=0.1)
    t["model.output_attn_res_proj.weight"] = draw(1, D, scale=0.4)
    t["lm_head.weight"] = draw(V, D)
    return t


def write_k3(out: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float64, fmt: str = "float",
             overrides: Mapping | None = None) -> str:
    """The tiny Kimi K3 as published (module docstring) into `out`, with the tiny tokenizer, in float (`fmt`: the
    format it is then rewritten in, whose config fields `overrides` carries: TinyArch.format_fields)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = k3_config(**dict(overrides or {}))
    text = cfg["text_config"]
    tensors = {f"language_model.{k}": v.to(dtype).contiguous() for k, v in k3_tensors(text, seed).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    umask_mode([out / "model.safetensors", out / "config.json"])

    class _Text:  # what save_tokenizer reads of a config
        vocab_size, max_position_embeddings = text["vocab_size"], text["max_position_embeddings"]

    save_tokenizer(out, _Text())
    return str(out)


# Kimi K3's quantization_config as published (its text_config's): MXFP4 routed experts, everything else bf16.
K3_MXFP4 = {
    "quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {"format": "mxfp4-pack-quantized", "targets": ["Linear"], "input_activations": None,
                                  "output_activations": None,
                                  "weights": {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32,
                                              "symmetric": True, "dynamic": False, "scale_dtype": "torch.uint8"}}},
    "ignore": ["re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
               "re:.*lm_head.*", "re:.*vision_tower.*", "re:.*mm_projector.*"],
    "kv_cache_scheme": None}


def write_published(src: str, out: Path) -> None:
    """The float checkpoint `src` with its routed experts in MXFP4 as Moonshot publishes K3 (compressed-tensors'
    mxfp4-pack-quantized: per expert `weight_packed` uint8 [N, K/2], `weight_scale` E8M0 uint8 [N, K/32])."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moelink.kernels.mxfp4 import mxfp4_quantize

    out = Path(out)
    shutil.copytree(src, out, dirs_exist_ok=True)
    tensors = {}
    for name, t in load_file(str(Path(src) / "model.safetensors")).items():
        if ".experts." in name and name.endswith(".weight"):
            blocks, scales = mxfp4_quantize(t)
            tensors[name.removesuffix("weight") + "weight_packed"] = blocks.reshape(t.shape[0], -1)
            tensors[name.removesuffix("weight") + "weight_scale"] = scales
        else:
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"]["quantization_config"] = K3_MXFP4
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    umask_mode([out / "model.safetensors", out / "config.json"])


ARCHS = {
    "kimi_k3": TinyArch("KimiK3ForConditionalGeneration", "Kimi K3 (its text model)", ("float", "published"),
                        write=write_k3, model_type="kimi_k3",
                        # MXFP4 groups of 32 along each expert's reduction dims: the latent and the intermediate size
                        format_fields={"published": {"routed_expert_hidden_size": 32, "moe_intermediate_size": 32}},
                        own_formats={"published": ("Kimi K3 as Moonshot publishes it: MXFP4 routed experts in "
                                                   "compressed-tensors (mxfp4-pack-quantized)", write_published)}),
    # SGLang's text-only K3 (KimiK3LinearForCausalLM): the text model alone (config.json the text_config's fields,
    # model_type kimi_linear; its tensors under model. / lm_head).
    "kimi_k3_text": TinyArch("KimiK3LinearForCausalLM", "Kimi K3's text model alone (SGLang's name)", ("float",),
                             write=published_as(write_k3, "KimiK3LinearForCausalLM", text_only=True)),
}

__all__ = ["ARCHS", "K3_MXFP4", "K3_TINY", "k3_config", "k3_tensors", "write_k3", "write_published"]
