"""DeepSeek-V4's tiny checkpoint and its published format: `moelink make-tiny-model --arch deepseek_v4 [--format
published]` and the test suite's (tests/helpers/dsv4_checkpoint.py, dsv4_published.py). Built by transformers' own
DeepseekV4ForCausalLM, what it initialises to constants randomised (`build_dsv4_model`); the published format
(`write_published_dsv4`) rewrites it as DeepSeek ships V4, by the rules of DeepSeek's inference code."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

import torch

from ...tools.file_modes import umask_mode
from ...tools.tiny_families import MAX_POS, VOCAB, TinyArch, save_model

# Compress rates of the tiny config: the block size of the engine's cache must be a multiple of both.
CSA_RATE, HCA_RATE = 2, 8

# One layer of each attention kind (sliding only, compressed sparse attention at rate 2 with an indexer top-4 (16
# index heads keep exact ties of the index scores out of the top-k boundary), heavily compressed attention at rate
# 8), a window of 6 tokens, three hyper-connection streams, two hash-routed MoE layers, sqrtsoftplus routing with a
# correction bias after them, a shared expert, and SwiGLU clamped at a limit the random weights reach.
DSV4_TINY = dict(
    vocab_size=VOCAB, max_position_embeddings=MAX_POS, initializer_range=0.1,
    hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
    head_dim=16, partial_rotary_factor=0.5, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=6,
    n_shared_experts=1, routed_scaling_factor=1.5, rope_theta=10000.0, compress_rope_theta=40000.0,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "compressed_sparse_attention"],
    compress_rates={"compressed_sparse_attention": CSA_RATE, "heavily_compressed_attention": HCA_RATE},
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
    hc_mult=3, hc_sinkhorn_iters=6, swiglu_limit=0.6, sliding_window=6, o_groups=2, o_lora_rank=8,
    index_n_heads=16, index_head_dim=8, index_topk=4, num_nextn_predict_layers=0,
)


def dsv4_config(**overrides):
    from transformers import DeepseekV4Config

    cfg = DeepseekV4Config(**{**DSV4_TINY, **overrides})
    cfg.architectures = ["DeepseekV4ForCausalLM"]
    return cfg


def build_dsv4_model(cfg, seed: int = 0):
    """transformers' DeepseekV4ForCausalLM in float64, with what it initialises to constants randomised (sinks,
    position biases, the hyper-connection bases and scales, norms, the correction bias, the hash table: each token's
    k distinct experts at random)."""
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)

    def rand_like(t, scale):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * scale

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("sinks", "position_bias", "base", "hc_base"):
                p.copy_(rand_like(p, 0.5))
            elif leaf in ("scale", "hc_scale"):
                p.copy_(1.0 + rand_like(p, 0.3))
            elif "norm" in name and leaf == "weight":
                p.add_(rand_like(p, 0.1))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(rand_like(b, 0.05))
            elif name.endswith("tid2eid"):
                E = cfg.n_routed_experts
                b.copy_(torch.stack([torch.randperm(E, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]))
    return model


def save_dsv4_checkpoint(out: Path, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> str:
    """Build the tiny V4 with transformers, randomise what it initialises to constants, save it + a tokenizer."""
    cfg = dsv4_config(**overrides)
    return save_model(build_dsv4_model(cfg, seed), out, cfg, dtype)


# -- DeepSeek-V4 as published ----------------------------------------------------------------------------------------
#
# From a float checkpoint transformers saved (save_dsv4_checkpoint above), with the format's own rules (those
# of DeepSeek's inference code: `act_quant` / `fp4_act_quant` with ue8m0 scales, and its convert.py's e2m1 table):
# - names as published: no `model.` prefix, `embed.weight`, `hc_head_fn` / `_base` / `_scale`, `attn.kv_norm.weight`
#   (transformers saves `attn.norm.weight`), per-expert `layers.{i}.ffn.experts.{e}.w{1,2,3}.weight`;
# - FP8 linears (attention's wq_a, wq_b, wkv, wo_a, wo_b, the indexer's wq_b, the shared expert's w1 / w2 / w3, an MTP
#   layer's e_proj / h_proj): float8_e4m3fn `X.weight` and `X.scale` float8_e8m0fnu, one per `block`:
#   scale = 2 ** ceil(log2(amax / 448)) (ue8m0 rounds the scale up, so no value saturates), e4m3 = round(w / scale);
# - FP4 routed experts (`expert_dtype: "fp4"`): e2m1 pairs a byte along K, the low nibble the even element, as int8
#   [N, K/2], `X.scale` float8_e8m0fnu [N, K/32] = 2 ** ceil(log2(amax / 6)) per 32 values, values rounded to the
#   nearest e2m1 (kernels/mxfp4.mxfp4_quantize). `expert_dtype="fp8"` writes the experts as FP8 linears instead;
# - config.json: `quantization_config = {quant_method fp8, fmt e4m3, activation_scheme dynamic, scale_fmt ue8m0,
#   weight_block_size}` and a top-level `expert_dtype` (V4's spelling).
# The tensors that stay float (compressors, indexer weights_proj, gate, norms, hyper-connections, embed, head) keep the
# float checkpoint's dtype (published: bf16).

# transformers' modules of the FP8 linears (DeepseekV4ForCausalLM's names; the compressors' kv_proj / gate_proj and the
# indexer's weights_proj ship in bf16 and stay float)
DSV4_HF_FP8_LINEARS = (".self_attn.q_a_proj", ".self_attn.q_b_proj", ".self_attn.kv_proj", ".self_attn.o_a_proj",
                       ".self_attn.o_b_proj", ".indexer.q_b_proj", ".shared_experts.gate_proj",
                       ".shared_experts.up_proj", ".shared_experts.down_proj")
DSV4_FP8_LINEARS = (".attn.wq_a.", ".attn.wq_b.", ".attn.wkv.", ".attn.wo_a.", ".attn.wo_b.", ".attn.indexer.wq_b.",
                    ".ffn.shared_experts.", ".e_proj.", ".h_proj.")
E4M3_MAX = 448.0


def dsv4_published_name(name: str) -> str:
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
    from moelink.kernels.mxfp4 import mxfp4_dequantize, mxfp4_quantize

    blocks_NSQ, scales_NS = mxfp4_quantize(w_NK)
    n = w_NK.shape[0]
    return (blocks_NSQ.reshape(n, -1).view(torch.int8), scales_NS.view(torch.float8_e8m0fnu),
            mxfp4_dequantize(blocks_NSQ, scales_NS, torch.float64))


def write_published_dsv4(float_dir: str, out_dir: Path, oracle_dir: Path | None = None,
                         block: tuple[int, int] = (16, 16), expert_dtype: str = "fp4") -> tuple[str, str | None]:
    """Write `out_dir` (the published format) and, with `oracle_dir`, its dequantized float twin (every quantized
    weight replaced by its dequantized value, exact in float64, under transformers' names); returns both paths."""
    from safetensors.torch import load_file, save_file

    src = Path(float_dir)
    (st_file,) = src.glob("*.safetensors")
    tensors = load_file(str(st_file))
    out, oracle = {}, {}
    for name, t in tensors.items():
        pub = dsv4_published_name(name)
        if ".experts." in name and ".shared_experts." not in name and name.endswith(".weight"):
            kind = expert_dtype
        elif any(s in name for s in DSV4_FP8_LINEARS) and name.endswith(".weight"):
            kind = "fp8"
        else:
            out[pub], oracle[name] = t, t
            continue
        if kind == "fp4":
            if t.shape[-1] % 32:
                raise ValueError(f"DeepSeek-V4 FP4 experts: {name} has K={t.shape[-1]}, not a multiple of 32 (one "
                                 "ue8m0 scale per 32 values): moe_intermediate_size and hidden_size must be.")
            q, s, deq = fp4_experts(t)
        else:
            q, s, deq = fp8_ue8m0(t, block)
        out[pub], out[pub[: -len("weight")] + "scale"], oracle[name] = q, s, deq.to(t.dtype)
    dirs = [(Path(out_dir), out)] + ([(Path(oracle_dir), oracle)] if oracle_dir is not None else [])
    for d, ts in dirs:
        shutil.copytree(src, d, dirs_exist_ok=True)
        (d / st_file.name).unlink()
        save_file(ts, str(d / "model.safetensors"), metadata={"format": "pt"})
        umask_mode([d / "model.safetensors"])
    raw = json.loads((Path(out_dir) / "config.json").read_text())
    raw["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "scale_fmt": "ue8m0", "weight_block_size": list(block)}
    if expert_dtype == "fp4":
        raw["expert_dtype"] = "fp4"
    (Path(out_dir) / "config.json").write_text(json.dumps(raw, indent=2))
    return str(out_dir), (str(oracle_dir) if oracle_dir is not None else None)


def _write(out: Path, *, seed: int, dtype: torch.dtype, fmt: str, overrides: Mapping) -> str:
    return save_dsv4_checkpoint(out, seed, dtype, **overrides)


def _published(float_dir: str, out: Path) -> object:
    return write_published_dsv4(float_dir, out)


# The published format's FP4 experts: their width a multiple of 32 (one ue8m0 scale per 32 values).
ARCHS = {
    "deepseek_v4": TinyArch(
        "DeepseekV4ForCausalLM", "DeepSeek-V4 (Flash, Pro)", ("float", "published"), write=_write,
        format_fields={"published": {"moe_intermediate_size": 32}},
        own_formats={"published": ("DeepSeek-V4 as DeepSeek publishes it: FP8 linears with ue8m0 block scales, FP4 "
                                   "routed experts, DeepSeek's tensor names", _published)}),
}

__all__ = ["ARCHS", "CSA_RATE", "DSV4_FP8_LINEARS", "DSV4_HF_FP8_LINEARS", "DSV4_TINY", "E4M3_MAX", "HCA_RATE",
           "build_dsv4_model", "dsv4_config", "dsv4_published_name", "fp4_experts", "fp8_ue8m0", "save_dsv4_checkpoint",
           "write_published_dsv4"]
