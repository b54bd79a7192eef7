"""A tiny DeepSeek-V4 checkpoint that bundles DSpark stages as DeepSeek publishes them (config.json's dspark_* fields,
`mtp.{i}.*` tensors beside the main ones: engine/models/deepseek_v4/dspark.py lists them), for the DSpark tests.

The stages' tensors are random (std 0.2 matrices, norms and hyper-connection scales around 1), named and shaped by
the stages' own weight plan at one rank. `agree=True` constructs the case where DSpark drafts the target's next
token: the main layers' outputs are zeroed (attention's wo_b, every expert's and the shared expert's w2), so the
streams stay proportional to the token's embedding and the target's next token is its bigram
argmax(head(norm(emb(x)))) (the hyper-head's and the norm's scales cancel in the norm); the stages' last norm is
zero (base logits zero) and the Markov head is that bigram: W1[x] = norm * rms(emb(x)), W2 = head, rank D.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moelink.engine.config.model import ModelConfig
from moelink.engine.models.deepseek_v4.dspark import DSV4DSparkStages
from moelink.engine.models.deepseek_v4.tiny import save_dsv4_checkpoint

from tests.helpers.dspark_draws import agree as bigram, draw_stages

MASK = 5
_ZEROED = (".attn.wo_b.weight", ".w2.weight")


def save_dsv4_with_dspark(out: Path, *, stages: int = 2, taps: tuple[int, ...] = (2, 3), block_size: int = 4,
                          rank: int = 8, agree: bool = False, seed: int = 0) -> str:
    """The checkpoint directory (module docstring)."""
    path = Path(save_dsv4_checkpoint(out, seed=seed, dtype=torch.float32))
    raw = json.loads((path / "config.json").read_text())
    raw.update(num_nextn_predict_layers=stages, dspark_block_size=block_size, dspark_noise_token_id=MASK,
               dspark_target_layer_ids=list(taps), dspark_markov_rank=raw["hidden_size"] if agree else rank)
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    (main,) = path.glob("*.safetensors")
    ts = load_file(main)
    if agree:
        ts = {n: torch.zeros_like(t) if n.startswith("model.layers.") and n.endswith(_ZEROED) else t
              for n, t in ts.items()}
        save_file(ts, str(main), metadata={"format": "pt"})
    cfg = ModelConfig.from_pretrained(str(path), dtype="float32")
    draft = draw_stages(DSV4DSparkStages, cfg, seed + 11)
    if agree:
        bigram(draft, f"mtp.{stages - 1}.", ts["model.embed_tokens.weight"], ts["head.weight"], ts["model.norm.weight"],
               cfg.rms_norm_eps, torch.float32)
    save_file({n: t.contiguous() for n, t in draft.items()}, str(path / "dspark.safetensors"),
              metadata={"format": "pt"})
    return str(path)
