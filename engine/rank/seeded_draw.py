"""A seeded row's draw on a CPU, as vLLM 0.32's CPU sampler makes it, so the same seed gives vLLM's tokens.

vLLM 0.32 samples on a CPU with a Gumbel-max kernel (`TopKTopPSampler.forward_cpu`, `torch.ops._C.
fused_gumbel_argmax`), not with the exponential race its GPU path runs: each step a seeded request draws one
integer from its own `torch.Generator` (`torch.randint(0, 2**31, (1,), generator=g)`), and that integer keys a
SplitMix64 hash that gives every token of the vocabulary its own Gumbel noise; the token is
`argmax(logit + gumbel)` over the processed logits (temperature, min-p, top-k, top-p; masked tokens -inf), in
float64. This module is that draw in torch ops, bit for bit (tests/engine/test_seeded_draw.py pins it against
values the real kernel returned). A row's noise depends only on its own seed, so a seeded row's token is the same
alone and in any batch.

On other devices the sampler keeps the exponential race, which is vLLM's GPU path (`random_sample`:
`probs / q`, `q[i].exponential_(generator=g)`).

Shape legend: S seeded rows, V vocabulary.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["draw_seeds", "gumbel_argmax"]

_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """A uint64 constant as the int64 bit pattern torch stores."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GAMMA = _i64(0x9E3779B97F4A7C15)  # SplitMix64's increment: token i's state is key + (i + 1) * gamma
_MUL1 = _i64(0xBF58476D1CE4E5B9)
_MUL2 = _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding uint64 bits (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser, in place on `z` (int64 holding uint64 bits; products wrap modulo 2^64 in torch, as
    the kernel's uint64 ones do)."""
    z ^= _shr(z, 30)
    z *= _MUL1
    z ^= _shr(z, 27)
    z *= _MUL2
    z ^= _shr(z, 31)
    return z


def _gumbel(state: torch.Tensor) -> torch.Tensor:
    """float64 Gumbel noise -log(-log u) of each token's SplitMix64 state (consumed), u = (53 bits + 0.5) / 2^53, in
    (0, 1) and never 0 or 1."""
    u = _shr(_splitmix64(state), 11).to(torch.float64)
    u.add_(0.5).mul_(2.0 ** -53)
    return u.log_().neg_().log_().neg_()


@functools.lru_cache(maxsize=8)
def _token_steps(V: int) -> torch.Tensor:
    """int64 [V]: (i + 1) * gamma per token, the same for every row and step (a vocabulary's worth, cached)."""
    return torch.arange(1, V + 1, dtype=torch.int64) * _GAMMA


def draw_seeds(generators: list[torch.Generator]) -> torch.Tensor:
    """int64 [S]: each seeded row's draw of this step, one integer from its own generator (vLLM's
    `torch.randint(0, 2**31, (1,), generator=g)`: what the generator advances by per sampled step)."""
    return torch.cat([torch.randint(0, 2**31, (1,), generator=g, dtype=torch.long) for g in generators])


def gumbel_argmax(logits_SV: torch.Tensor, seeds_S: torch.Tensor) -> torch.Tensor:
    """long [S]: argmax over each row of float32 `logits_SV` (CPU) plus the SplitMix64 Gumbel noise its seed keys;
    a row of only -inf picks token 0, as the kernel does."""
    S, V = logits_SV.shape
    key_S = _splitmix64(seeds_S.to(torch.int64, copy=True))
    finite_SV = logits_SV > float("-inf")
    rows, cols = finite_SV.nonzero(as_tuple=True)
    if 2 * rows.numel() < S * V:
        # top-k / top-p / min-p left few tokens: noise for those alone (a masked token's score is -inf either way)
        scores_SV = torch.full((S, V), float("-inf"), dtype=torch.float64)
        state = key_S[rows] + (cols + 1) * _GAMMA
        scores_SV[rows, cols] = logits_SV[rows, cols].to(torch.float64) + _gumbel(state)
        return scores_SV.argmax(dim=-1)
    scores_SV = _gumbel(key_S.unsqueeze(1) + _token_steps(V))
    return scores_SV.add_(logits_SV.to(torch.float64)).argmax(dim=-1)
