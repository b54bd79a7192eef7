"""The draft tensors of a family's bundled DSpark stages for the tiny test checkpoints
(tests/helpers/dsv4_dspark_checkpoint.py, dsv41_dspark_checkpoint.py): random ones shaped by the stages' own weight
plan at one rank, and the Markov head that makes the drafts the target's bigram (`agree`)."""
from __future__ import annotations

import torch

from moelink.engine.config.dspark import read_bundled_dspark
from moelink.engine.config.model import ModelConfig
from moelink.kernels.ops import ReferenceKernels


def draw_stages(stages_cls, cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """A seeded tensor per name of the weight plan of `stages_cls` (the family's DSparkStages, built on the meta
    device at one rank): std 0.2 matrices, norms and hyper-connection scales around 1 (biases, sinks and
    hyper-connection bases around 0)."""
    meta, V, D = torch.device("meta"), cfg.vocab_size, cfg.hidden_size
    plan = stages_cls(cfg, read_bundled_dspark(cfg.hf_config), ReferenceKernels(), meta, torch.empty(V, D, device=meta),
                      torch.empty(V, D, device=meta)).weight_plan()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, entry in plan.items():
        shape = tuple((entry.dest[entry.index] if entry.index else entry.dest).shape)
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        flat = len(shape) == 1 and not name.endswith(("gate.bias", "attn_sink", "_base"))
        out[name] = (1 + 0.1 * t if flat else 0.2 * t).to(entry.dest.dtype)
    return out


def agree(draft: dict, last: str, embed: torch.Tensor, head: torch.Tensor, norm: torch.Tensor, eps: float,
          dtype: torch.dtype) -> None:
    """`draft` made to draft the bigram argmax(head(norm(emb(x)))): the last stage's norm (`last` + "norm.weight")
    zero, so the base logits are zero, and the Markov head W1[x] = norm * rms(emb(x)), W2 = head (rank D)."""
    e = embed.double()
    x = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + eps) * norm.double()
    draft[last + "norm.weight"] = torch.zeros(e.shape[1], dtype=dtype)
    draft[last + "markov_head.markov_w1.weight"] = x.to(dtype)
    draft[last + "markov_head.markov_w2.weight"] = head.to(dtype)
