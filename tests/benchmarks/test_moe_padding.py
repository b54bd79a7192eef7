"""benchmarks/moe_padding.py: the useful fraction of a sorted MoE GEMM's rows at a BLOCK_M under uniform routing,
checked against a direct sum over the binomial and a sampled routing."""
from __future__ import annotations

import math

import torch

from moelink.benchmarks.moe_padding import binomial_pmf, useful_fraction


def test_the_pmf_sums_to_one_and_matches_the_closed_form():
    pmf = dict(binomial_pmf(40, 0.25))
    assert abs(sum(pmf.values()) - 1) < 1e-12
    assert abs(pmf[10] / (math.comb(40, 10) * 0.25**10 * 0.75**30) - 1) < 1e-12


def test_block_m_one_wastes_nothing_and_deepseek_at_4096_tokens_loses_a_third_at_128():
    assert abs(useful_fraction(64, 2, 8, 1) - 1) < 1e-9
    assert 0.66 < useful_fraction(4096, 8, 256, 128) < 0.70  # 128 rows an expert on average: half pad to 256
    assert useful_fraction(4096, 8, 256, 64) > 0.80 > useful_fraction(4096, 8, 256, 128)


def test_it_matches_a_sampled_routing():
    T, K, E, BM = 512, 4, 16, 32
    gen = torch.Generator().manual_seed(0)
    fracs = []
    for _ in range(200):
        ids = torch.rand(T, E, generator=gen).topk(K, dim=1).indices  # K distinct experts a token, uniform
        n = torch.bincount(ids.flatten(), minlength=E)
        fracs.append(n.sum().item() / ((n + BM - 1) // BM * BM).sum().item())
    assert abs(sum(fracs) / len(fracs) - useful_fraction(T, K, E, BM)) < 0.01
