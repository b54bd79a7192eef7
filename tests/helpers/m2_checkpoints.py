"""Tiny MiniMax-M2 and MiMo-V2-Flash checkpoints built and saved by transformers itself (its own model classes,
`save_pretrained`), with the tiny tokenizer beside them: nothing in these files is written by moelink.

What each exercises:
- MiniMax-M2 (`minimax`): q/k RMSNorm over all heads at once ([N * H] and [K * H] weights, noisy so a per-head
  norm would differ), a quarter of each head rotated (rotary_dim 4 of 16), GQA 4 / 2, sigmoid routing over 6
  experts with a correction bias beside the router (`block_sparse_moe.e_score_correction_bias`), Mixtral's
  expert names (w1 / w3 / w2), every layer routed.
- MiMo-V2-Flash (`mimo`): layer_types mixing full and sliding-window layers, unequally (2 full, 3 sliding:
  one block table serves all), the sliding ones with twice the kv heads (2 vs 1), sinks (`attention_sink_bias`)
  and a rope of their own (theta 10000 over half of each head vs 5e6 over a third), values narrower than q/k
  (v_head_dim 16 vs head_dim 24) scaled by attention_value_scale, q/k/v biases, a dense first layer, DeepSeek-V3
  routing over 8 experts in 2 groups (1 chosen) with a float32 router and correction bias, a 6-token window.

Every parameter transformers initialises to a constant gets random values here (norm weights, biases, sinks,
the correction bias), so a weight loaded into the wrong place shows. The MiniMax correction bias is drawn in
float32: transformers keeps it in the model dtype (float64 here) and adds it to float32 sigmoid scores in
float64, moelink holds it in float32 as every serving engine does; drawn in float32 the two sums differ only
by the rounding of the float32 add, never by the bias itself.
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB, MAX_POS, WINDOW = 400, 512, 6

# name -> (config class, model class, fields)
M2_TINY: dict[str, tuple[str, str, dict]] = {
    "minimax": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(
        hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, rotary_dim=4, num_local_experts=6, num_experts_per_tok=2, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=None)),
    "mimo": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, v_head_dim=16, n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=2, sliding_window=WINDOW, attention_bias=True, attention_value_scale=0.707,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse", "sparse"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.334},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5}},
        bos_token_id=None)),
}


def m2_config(name: str, **overrides):
    import transformers

    config_cls, model_cls, fields = M2_TINY[name]
    cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, max_position_embeddings=MAX_POS, initializer_range=0.1,
                                             **{**fields, **overrides})
    cfg.architectures = [model_cls]
    return cfg


def save_m2_checkpoint(out: Path, name: str, seed: int = 0, dtype: torch.dtype = torch.float64, fused: bool = False,
                       **overrides) -> str:
    """Build M2_TINY[name] with transformers, draw what it initialises to constants, save it + the tokenizer.
    `fused`: in transformers 5's own names (save_original_format=False: experts.gate_up_proj / down_proj, the
    router at mlp.gate, MiMo's sinks as self_attn.sinks), not the published ones."""
    import transformers

    from moelink.engine.tools.tiny_corpus import train_tiny_tokenizer, write_tokenizer_configs

    cfg = m2_config(name, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, cfg.architectures[0])(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
            elif pname.endswith(".bias"):  # q/k/v biases (MiMo's attention_bias)
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
            elif pname.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        for mod in model.modules():
            bias = getattr(mod, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_((torch.randn(bias.shape, generator=g) * 0.05).to(bias.dtype))
    out = Path(out)
    model.to(dtype).save_pretrained(out, **({"save_original_format": False} if fused else {}))
    tok = train_tiny_tokenizer(VOCAB)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_configs(out, tok, MAX_POS)
    return str(out)
