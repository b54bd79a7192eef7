"""Shared helpers of the sampler tests."""
from __future__ import annotations

import torch

from moelink.engine.rank.sampler import Sampler, SamplerOutput, SamplingMetadata
from moelink.engine.contract.sampling_params import SamplingParams

CPU = torch.device("cpu")


def build(params, logits_BV, prompts=None, outputs=None, gens=None, eos=(), device=CPU):
    B, V = logits_BV.shape
    return SamplingMetadata.build(
        params,
        prompts if prompts is not None else [[] for _ in range(B)],
        outputs if outputs is not None else [[] for _ in range(B)],
        gens if gens is not None else [None] * B,
        set(eos),
        V,
        device,
    )


def sample(params, logits_BV, **kw) -> SamplerOutput:
    return Sampler()(logits_BV, build(params, logits_BV, **kw))


def draw_counts(p: SamplingParams, logits_V: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Counts per token of n independent draws (one batch of n identical rows)."""
    torch.manual_seed(seed)
    logits_BV = logits_V.expand(n, -1).contiguous()
    out = sample([p] * n, logits_BV)
    return torch.bincount(out.token_ids_B, minlength=logits_V.numel())


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "drew a token with probability 0"
    exp = probs[keep].double() * n
    return (((counts[keep].double() - exp) ** 2) / exp).sum().item()


# Worked distribution over 6 tokens, stored in a shuffled order so that nothing
# relies on the vocabulary being sorted. Position → probability:
#   tok: 0     1     2     3     4     5
#   p:   0.10  0.40  0.04  0.25  0.06  0.15
# Sorted best first: 1 (.40), 3 (.25), 5 (.15), 0 (.10), 4 (.06), 2 (.04).
PROBS6 = torch.tensor([0.10, 0.40, 0.04, 0.25, 0.06, 0.15])
LOGITS6 = PROBS6.log() + 3.0  # a constant shift leaves softmax unchanged
