"""A tiny DeepSeek-V4.1 checkpoint with DSpark draft layers as DeepSeek publishes them (config.json's
num_nextn_predict_layers and dspark_* fields, `mtp.{i}.*` tensors beside the main ones:
engine/models/deepseek_v41/dspark.py lists them), for the V4.1 DSpark tests. The main model is make-tiny-model's
(engine/models/deepseek_v41/tiny.py: every V4.1 mechanism, Engram included); its draft layers route over their own
smaller expert bank (dspark_n_routed_experts 4, top 1, against the main layers' 6, top 2; `draft_experts` (6, 2) for
an expert-parallel run, where the draft layers' experts are placed as the main layers').

The draft tensors are random (std 0.2 matrices, norms and hyper-connection scales around 1), named and shaped by the
stages' own weight plan at one rank. `agree=True` constructs the case where DSpark drafts the target's next token:
every main layer's output is zeroed (attention's wo_b, every expert's and the shared expert's w2, the Engram's wkv),
so every stream stays the token's embedding (the hyper-connections' comb mixes are doubly stochastic) and the target's
next token is its bigram argmax(head(norm(emb(x)))) (the collapse's positive sum and the norm's scale cancel); the
draft layers' last norm is zero (base logits zero) and the Markov head is that bigram: W1[x] = norm * rms(emb(x)),
W2 = head, rank D.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moelink.engine.config.model import ModelConfig
from moelink.engine.models.deepseek_v41.dspark import V41DSparkStages
from moelink.engine.models.deepseek_v41.tiny import write_tiny

from tests.helpers.dspark_draws import agree as bigram, draw_stages

_ZEROED = (".attn.wo_b.weight", ".w2.weight", ".engram.wkv.weight")


def save_dsv41_with_dspark(out: Path, *, stages: int = 2, taps: tuple[int, ...] = (2, 5, 7), block_size: int = 4,
                           rank: int = 8, agree: bool = False, seed: int = 0, dtype=torch.float64,
                           draft_experts: tuple[int, int] = (4, 1)) -> str:
    """The checkpoint directory (module docstring); `draft_experts`: the draft layers' (experts, top k)."""
    overrides = dict(num_nextn_predict_layers=stages, dspark_block_size=block_size, dspark_target_layer_ids=list(taps),
                     dspark_markov_rank=32 if agree else rank, dspark_n_routed_experts=draft_experts[0],
                     dspark_num_experts_per_tok=draft_experts[1])
    path = Path(write_tiny(Path(out), seed=seed, dtype=dtype, overrides=overrides))
    main = path / "model.safetensors"
    ts = load_file(main)
    if agree:
        ts = {n: torch.zeros_like(t) if n.endswith(_ZEROED) else t for n, t in ts.items()}
        save_file(ts, str(main), metadata={"format": "pt"})
    cfg = ModelConfig.from_pretrained(str(path), dtype=str(dtype)[6:])
    assert not agree or cfg.hidden_size == 32
    draft = draw_stages(V41DSparkStages, cfg, seed + 11)
    if agree:
        bigram(draft, f"mtp.{stages - 1}.", ts["model.embed.weight"], ts["lm_head.weight"], ts["model.norm.weight"],
               cfg.rms_norm_eps, dtype)
    save_file({n: t.contiguous() for n, t in draft.items()}, str(path / "dspark.safetensors"),
              metadata={"format": "pt"})
    return str(path)
