"""A tiny EAGLE-3 draft head with random weights, in exactly the published layout (engine/spec/heads/eagle3.py lists
the tensors; engine/config/eagle3.py the config.json fields), for tests: no download.

config.json is what EAGLE's and SpecForge's exports write (architectures ["LlamaForCausalLMEagle3"], model_type
"llama", num_hidden_layers 1, vocab_size the target's, draft_vocab_size, target_hidden_size when it differs);
weights go to model.safetensors. The draft vocabulary is a random subset of the target's, in increasing order as
the published heads build it from token frequencies: d2t[i] = target id - i, t2d marks the subset.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .file_modes import umask_mode

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def eagle3_tensors(cfg: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32, embeddings: bool = True,
                   lm_head: bool = True, vocab_map: bool = True) -> dict[str, torch.Tensor]:
    """The head's tensors for config.json dict `cfg` (as write_eagle3_checkpoint writes it): random, std 0.2 for
    matrices, norms around 1; `embeddings` / `lm_head` / `vocab_map`: include embed_tokens / lm_head / d2t + t2d."""
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    Vd, Dt = cfg.get("draft_vocab_size") or V, cfg.get("target_hidden_size") or D
    N, K = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    H, I = cfg.get("head_dim") or D // N, cfg["intermediate_size"]
    g = torch.Generator().manual_seed(seed)

    def mat(*shape):
        return (0.2 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    def norm(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)

    p = "midlayer."
    t = {"fc.weight": mat(D, 3 * Dt), p + "input_layernorm.weight": norm(D), p + "hidden_norm.weight": norm(D),
         p + "self_attn.q_proj.weight": mat(N * H, 2 * D), p + "self_attn.k_proj.weight": mat(K * H, 2 * D),
         p + "self_attn.v_proj.weight": mat(K * H, 2 * D), p + "self_attn.o_proj.weight": mat(D, N * H),
         p + "post_attention_layernorm.weight": norm(D), p + "mlp.gate_proj.weight": mat(I, D),
         p + "mlp.up_proj.weight": mat(I, D), p + "mlp.down_proj.weight": mat(D, I), "norm.weight": norm(D)}
    if cfg.get("attention_bias"):
        t.update({p + "self_attn.q_proj.bias": mat(N * H), p + "self_attn.k_proj.bias": mat(K * H),
                  p + "self_attn.v_proj.bias": mat(K * H), p + "self_attn.o_proj.bias": mat(D)})
    if embeddings:
        t["embed_tokens.weight"] = mat(V, D)
    if lm_head:
        t["lm_head.weight"] = mat(Vd, D)
    if vocab_map:
        target_ids = torch.randperm(V, generator=g)[:Vd].sort().values
        t["d2t"] = target_ids - torch.arange(Vd)
        t["t2d"] = torch.zeros(V, dtype=torch.bool)
        t["t2d"][target_ids] = True
    return t


def write_eagle3_checkpoint(out: str | Path, *, hidden_size: int = 32, num_attention_heads: int = 4,
                            num_key_value_heads: int = 2, head_dim: int | None = None, intermediate_size: int = 48,
                            vocab_size: int = 96, draft_vocab_size: int | None = 40,
                            target_hidden_size: int | None = None, rms_norm_eps: float = 1e-5,
                            rope_theta: float = 10000.0, max_position_embeddings: int = 256,
                            attention_bias: bool = False, norm_before_residual: bool | None = None,
                            aux_layer_ids: list[int] | None = None, extra: dict | None = None, seed: int = 0,
                            dtype: torch.dtype = torch.float32, embeddings: bool = True, lm_head: bool = True,
                            vocab_map: bool = True) -> Path:
    """Write config.json and model.safetensors of a random head to the new or empty directory `out`; returns it.
    draft_vocab_size None leaves the field out (the full vocabulary); aux_layer_ids go to eagle_config as SpecForge
    writes them; `extra`: more config.json fields (or overrides)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out={str(out)!r} is invalid: it exists and is not empty.")
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_act": "silu",
           "hidden_size": hidden_size, "intermediate_size": intermediate_size,
           "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
           "num_hidden_layers": 1, "rms_norm_eps": rms_norm_eps, "rope_theta": rope_theta, "rope_scaling": None,
           "max_position_embeddings": max_position_embeddings, "vocab_size": vocab_size,
           "tie_word_embeddings": False, "attention_bias": attention_bias, "torch_dtype": _DTYPES[dtype]}
    optional = {"head_dim": head_dim, "draft_vocab_size": draft_vocab_size, "target_hidden_size": target_hidden_size,
                "norm_before_residual": norm_before_residual}
    cfg.update({k: v for k, v in optional.items() if v is not None})
    if aux_layer_ids is not None:
        cfg["eagle_config"] = {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": list(aux_layer_ids)}
    cfg.update(extra or {})
    tensors = eagle3_tensors(cfg, seed=seed, dtype=dtype, embeddings=embeddings, lm_head=lm_head,
                             vocab_map=vocab_map)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    umask_mode([out / "model.safetensors"])
    return out
