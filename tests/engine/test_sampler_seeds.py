"""Sampler: seeded rows are batch-independent; bad inputs; the CUDA contract.

Shape legend: B rows, V vocabulary.
"""
from __future__ import annotations


import pytest
import torch

from moelink.engine.rank.sampler import Sampler, SamplingMetadata
from moelink.engine.contract.sampling_params import SamplingParams

from tests.helpers.sampler import CPU, build, sample


# ---------------------------------------------------------------- seeds


def _mixed_batch(step: int, seeded_row_logits_V: torch.Tensor, seeded_params: SamplingParams, gen, others):
    """16 rows: the seeded request at row 7 among greedy, unseeded and other seeded rows."""
    g = torch.Generator().manual_seed(1000 + step)
    V = seeded_row_logits_V.numel()
    logits_BV = torch.randn(16, V, generator=g)
    logits_BV[7] = seeded_row_logits_V
    kinds = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_p=0.9, seed=1), SamplingParams(top_k=4)]
    params = [kinds[i % 4] for i in range(16)]
    gens = [others[i] if i % 4 == 2 else None for i in range(16)]
    params[7], gens[7] = seeded_params, gen
    return params, logits_BV, gens


@pytest.mark.parametrize(
    "seeded_params",
    [SamplingParams(seed=42), SamplingParams(seed=42, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05)],
)
def test_seeded_row_is_batch_independent(seeded_params):
    V, steps = 64, 6
    step_logits = [torch.randn(V, generator=torch.Generator().manual_seed(s)) for s in range(steps)]

    alone_gen = torch.Generator().manual_seed(42)
    alone = []
    for s in range(steps):
        alone.append(sample([seeded_params], step_logits[s].unsqueeze(0), gens=[alone_gen]).token_ids_B.item())

    torch.manual_seed(123)  # unseeded rows draw from the default generator: must not matter
    batch_gen = torch.Generator().manual_seed(42)
    others = {i: torch.Generator().manual_seed(i) for i in range(16)}
    in_batch = []
    for s in range(steps):
        params, logits_BV, gens = _mixed_batch(s, step_logits[s], seeded_params, batch_gen, others)
        in_batch.append(sample(params, logits_BV, gens=gens).token_ids_B[7].item())
    assert alone == in_batch
    assert len(set(alone)) > 1  # the test would be vacuous if it always picked one token


def test_generator_advances_only_when_row_is_sampled():
    V = 10
    logits_BV = torch.randn(2, V)
    g = torch.Generator().manual_seed(9)
    ref = torch.Generator().manual_seed(9)
    # Greedy with a generator: untouched.
    sample([SamplingParams(temperature=0.0, seed=9), SamplingParams()], logits_BV, gens=[g, None])
    assert torch.equal(g.get_state(), ref.get_state())
    # Sampled on a CPU: advances by exactly one integer, vLLM's CPU draw (engine/rank/seeded_draw.py).
    sample([SamplingParams(seed=9), SamplingParams()], logits_BV, gens=[g, None])
    torch.randint(0, 2**31, (1,), generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


# ---------------------------------------------------------------- errors and devices


def test_bad_inputs_raise_clear_errors():
    logits_BV = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="one entry per row"):
        SamplingMetadata.build([SamplingParams()] * 2, [[]], [[], []], [None, None], set(), 8, CPU)
    meta = build([SamplingParams()] * 2, logits_BV)
    with pytest.raises(ValueError, match="does not match"):
        Sampler()(torch.zeros(3, 8), meta)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_contract():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    logits_BV = torch.randn(16, 1000, device=dev, dtype=torch.bfloat16)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=5, top_p=0.9, min_p=0.01, logprobs=3, seed=3),
              SamplingParams(repetition_penalty=1.2, min_tokens=2), SamplingParams(top_k=50)] * 4
    gens = [torch.Generator(device=dev).manual_seed(i) if p.seed is not None else None for i, p in enumerate(params)]
    meta = build(params, logits_BV, outputs=[[1, 2]] * 16, prompts=[[5]] * 16, gens=gens, eos={0}, device=dev)
    out = Sampler()(logits_BV, meta)
    assert out.token_ids_B.device.type == "cuda"
    assert torch.equal(out.token_ids_B[0::4], logits_BV[0::4].float().argmax(-1))
    assert out.logprobs[1].token_id == out.token_ids_B[1].item()
    # Seeded row alone gives the same token.
    g = torch.Generator(device=dev).manual_seed(1)
    alone = Sampler()(logits_BV[1:2], build([params[1]], logits_BV[1:2], outputs=[[1, 2]], prompts=[[5]], gens=[g], eos={0}, device=dev))
    assert alone.token_ids_B.item() == out.token_ids_B[1].item()
