"""A tiny DSpark draft checkpoint with random weights, in the DFlash format SGLang's `DSparkDraftModel` /
`Qwen3DSparkModel` read (engine/spec/heads/dspark.py lists the tensors; engine/config/dspark.py the config.json
fields), for tests and benchmarks: no download.

config.json: a Qwen3 config (`architectures` ["DSparkDraftModel"], model_type "qwen3") with `block_size`,
`dflash_config` {`target_layer_ids`, `mask_token_id`}, `markov_rank`, `markov_head_type` "vanilla",
`num_target_layers`; weights go to model.safetensors (`tensors` may replace any of them: a constructed draft).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .file_modes import umask_mode


def dspark_config(*, hidden_size: int, vocab_size: int, target_layer_ids: list[int], num_target_layers: int,
                  mask_token_id: int, num_layers: int = 1, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                  head_dim: int | None = None, intermediate_size: int = 64, block_size: int = 4,
                  markov_rank: int = 16, rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0) -> dict:
    """config.json's fields (module docstring)."""
    return {"architectures": ["DSparkDraftModel"], "model_type": "qwen3", "hidden_size": hidden_size,
            "num_hidden_layers": num_layers, "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads, "head_dim": head_dim or hidden_size // num_attention_heads,
            "intermediate_size": intermediate_size, "rms_norm_eps": rms_norm_eps, "rope_theta": rope_theta,
            "vocab_size": vocab_size, "max_position_embeddings": 4096, "hidden_act": "silu",
            "block_size": block_size, "num_target_layers": num_target_layers, "markov_rank": markov_rank,
            "markov_head_type": "vanilla",
            "dflash_config": {"target_layer_ids": list(target_layer_ids), "mask_token_id": mask_token_id}}


def dspark_tensors(cfg: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors for config.json dict `cfg`: std 0.2 matrices, norms around 1."""
    D, V, R = cfg["hidden_size"], cfg["vocab_size"], cfg["markov_rank"]
    N, K, H, I = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]
    n = len(cfg["dflash_config"]["target_layer_ids"])
    g = torch.Generator().manual_seed(seed)

    def mat(*shape):
        return (0.2 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    def norm(size):
        return (1.0 + 0.1 * torch.randn(size, generator=g, dtype=torch.float64)).to(dtype)

    t = {"fc.weight": mat(D, n * D), "hidden_norm.weight": norm(D), "norm.weight": norm(D),
         "markov_head.markov_w1.weight": mat(V, R), "markov_head.markov_w2.weight": mat(V, R)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        t.update({p + "input_layernorm.weight": norm(D), p + "post_attention_layernorm.weight": norm(D),
                  p + "self_attn.q_proj.weight": mat(N * H, D), p + "self_attn.k_proj.weight": mat(K * H, D),
                  p + "self_attn.v_proj.weight": mat(K * H, D), p + "self_attn.o_proj.weight": mat(D, N * H),
                  p + "self_attn.q_norm.weight": norm(H), p + "self_attn.k_norm.weight": norm(H),
                  p + "mlp.gate_proj.weight": mat(I, D), p + "mlp.up_proj.weight": mat(I, D),
                  p + "mlp.down_proj.weight": mat(D, I)})
    return t


def write_dspark_checkpoint(out: str | Path, cfg: dict, tensors: dict[str, torch.Tensor] | None = None, *,
                            seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json and model.safetensors for `cfg` into directory `out`; `tensors` replace the random ones
    of the same names (and may add a confidence head's). Returns the directory."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ts = dspark_tensors(cfg, seed=seed, dtype=dtype)
    ts.update(tensors or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({n: t.contiguous() for n, t in ts.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    umask_mode([out / "model.safetensors"])
    return out


def bigram_target(src: str | Path, dst: str | Path, scale: float = 0.0) -> Path:
    """A copy of checkpoint `src` with every layer's output projection (o_proj, expert and dense down projections)
    times `scale`: at 0 its greedy next token is exactly argmax(lm_head(norm(emb(x)))) of the last token x, a
    bigram that `agreeing_draft` drafts; small scales keep it nearly so."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst = Path(dst)
    shutil.copytree(src, dst)
    downs = ("o_proj.weight", "down_proj.weight", ".w2.weight", "experts.down_proj")
    for f in sorted(dst.glob("*.safetensors")):
        ts = load_file(f)
        save_file({n: t * scale if n.endswith(downs) else t for n, t in ts.items()}, str(f), metadata={"format": "pt"})
        umask_mode([f])
    return dst


def agreeing_draft(target: str | Path, out: str | Path, *, block_size: int, target_layer_ids: list[int],
                   mask_token_id: int = 0) -> Path:
    """A draft for Qwen3-style checkpoint `target` (model.embed_tokens, model.norm, lm_head) built to draft its
    bigram: the Markov head is W1[x] = norm * rms(emb(x)), W2 = lm_head (rank D), so bias(x) = lm_head(norm(emb(x)));
    the draft's final norm is zero, so its base logits are zero and the stages only run. On a `bigram_target` its
    drafts are the target's own tokens (a constructed case of full acceptance; the stages are random)."""
    from safetensors.torch import load_file

    target = Path(target)
    ts: dict = {}
    for f in sorted(target.glob("*.safetensors")):
        ts.update(load_file(f))
    raw = json.loads((target / "config.json").read_text())
    embed = ts["model.embed_tokens.weight"].double()
    head, norm = ts.get("lm_head.weight", embed).double(), ts["model.norm.weight"].double()
    V, D = embed.shape
    w1 = embed * torch.rsqrt(embed.pow(2).mean(-1, keepdim=True) + raw.get("rms_norm_eps", 1e-6)) * norm
    cfg = dspark_config(hidden_size=D, vocab_size=V, target_layer_ids=target_layer_ids,
                        num_target_layers=raw["num_hidden_layers"], mask_token_id=mask_token_id,
                        block_size=block_size, markov_rank=D)
    return write_dspark_checkpoint(out, cfg, {"norm.weight": torch.zeros(D), "markov_head.markov_w1.weight": w1.float(),
                                              "markov_head.markov_w2.weight": head.float()})


__all__ = ["agreeing_draft", "bigram_target", "dspark_config", "dspark_tensors", "write_dspark_checkpoint"]
