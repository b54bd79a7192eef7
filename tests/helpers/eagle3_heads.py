"""Tiny EAGLE-3 heads for the speculative-decoding tests (engine/spec/proposer/eagle3.py), in the published layout
(engine/tools/eagle3_checkpoint.py writes config.json and the tensors).

`scaled_target`: a copy of a tiny target whose layers' outputs are scaled down (every o_proj and expert or dense
down projection times `main_scale`), so its greedy token after x is nearly argmax(lm_head(norm(emb(x)))), a bigram.

`bigram_head`: a head built to draft that bigram, so that its drafts are accepted often. Its row for token x
(at any position) computes y = e + small, e = rms(emb(x)), so its draft is argmax(lm_head(norm(y))), the
target's bigram of x, through these pieces:
- attention that looks at its own position only: q and k are the same constant per head (their biases, weights
  `leak`-small), so after rope q_m . k_n = |c|^2-weighted sum of cos((m - n) theta_i), largest at m = n; |c| is
  set so that every other position is behind by >= 40 logits (the smallest gap, at m - n = 1, is 0.25 * 2a^2 *
  sum_i (1 - cos theta_i) ~ 0.5 a^2 over the first pairs);
- v = [I | leak * random] over [e | hidden_norm(g)] and o_proj = I (N = K heads, N * H = D): the attention
  returns e;
- norm_before_residual with hidden_norm 0.05: the conditioning state (fc of the captured target states, or the
  previous chained output) enters the residual at 1/20 of e's size, so it counts but seldom flips the argmax;
- the MLP's down projection `leak`-small; `norm` the target's final norm, `embed_tokens` / `lm_head` the target's
  tables (the head over its draft vocabulary: the ids the target's bigram reaches, filled up with random others,
  in increasing order, as a frequency-built draft vocabulary; d2t / t2d map them).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moelink.engine.tools.eagle3_checkpoint import write_eagle3_checkpoint

_DOWN = ("o_proj.weight", "down_proj.weight", ".w2.weight", "experts.down_proj")


def scaled_target(src: str | Path, dst: str | Path, main_scale: float = 0.1) -> Path:
    """A copy of target checkpoint `src` with its layers' outputs scaled by `main_scale` (module docstring)."""
    dst = Path(dst)
    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        ts = load_file(f)
        save_file({n: t * main_scale if n.endswith(_DOWN) else t for n, t in ts.items()}, str(f),
                  metadata={"format": "pt"})
    return dst


def _target_tables(target: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(embed [V, D], lm_head [V, D], final norm [D], its eps) of the target checkpoint, float32."""
    ts: dict = {}
    for f in sorted(target.glob("*.safetensors")):
        ts.update(load_file(f))
    cfg = json.loads((target / "config.json").read_text())
    embed = ts["model.embed_tokens.weight"].float()
    head = ts.get("lm_head.weight", embed).float()
    return embed, head, ts["model.norm.weight"].float(), cfg.get("rms_norm_eps", 1e-6)


def bigram_head(target: str | Path, out: str | Path, *, leak: float = 0.05, draft_vocab_size: int | None = None,
                aux_layer_ids: list[int] | None = None, seed: int = 0) -> Path:
    """A head for `target` (a scaled_target) that drafts its bigram (module docstring); returns its directory."""
    target = Path(target)
    embed, lm_head, norm, eps = _target_tables(target)
    V, D = embed.shape
    N = 4
    H = D // N
    x = embed * torch.rsqrt(embed.pow(2).mean(-1, keepdim=True) + eps)
    bigram = (x * norm) @ lm_head.T
    reached = bigram.argmax(-1).unique()
    Vd = draft_vocab_size or min(V, len(reached) + V // 8)
    g = torch.Generator().manual_seed(seed)
    others = torch.tensor([i for i in torch.randperm(V, generator=g).tolist() if i not in set(reached.tolist())])
    target_ids = torch.cat([reached, others[: max(Vd - len(reached), 0)]]).sort().values
    path = write_eagle3_checkpoint(out, hidden_size=D, num_attention_heads=N, num_key_value_heads=N, head_dim=H,
                                   intermediate_size=48, vocab_size=V, draft_vocab_size=len(target_ids),
                                   rms_norm_eps=eps, max_position_embeddings=64, attention_bias=True,
                                   norm_before_residual=True, aux_layer_ids=aux_layer_ids, seed=seed)
    f = path / "model.safetensors"
    t = load_file(f)
    p, a = "midlayer.self_attn.", 14.0
    eye = torch.eye(D)
    t.update({
        "embed_tokens.weight": embed.clone(), "lm_head.weight": lm_head[target_ids].clone(),
        "norm.weight": norm.clone(),
        "d2t": target_ids - torch.arange(len(target_ids)), "t2d": torch.zeros(V, dtype=torch.bool).index_fill_(
            0, target_ids, True),
        "midlayer.input_layernorm.weight": torch.ones(D), "midlayer.hidden_norm.weight": torch.full((D,), 0.05),
        p + "q_proj.weight": t[p + "q_proj.weight"] * leak, p + "q_proj.bias": torch.full((N * H,), a),
        p + "k_proj.weight": t[p + "k_proj.weight"] * leak, p + "k_proj.bias": torch.full((N * H,), a),
        p + "v_proj.weight": torch.cat([eye, t[p + "v_proj.weight"][:, D:] * leak], dim=1),
        p + "v_proj.bias": torch.zeros(N * H), p + "o_proj.weight": eye.clone(), p + "o_proj.bias": torch.zeros(D),
        "midlayer.mlp.down_proj.weight": t["midlayer.mlp.down_proj.weight"] * leak,
    })
    save_file({k: v.contiguous() for k, v in t.items()}, str(f), metadata={"format": "pt"})
    return path
