"""Routing, expert maps and small launch configs shared by the fused-MoE kernel tests (float, biases, MXFP4)."""
from __future__ import annotations

import torch

from moelink.kernels.moe_config import MoELaunchConfig

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

SMALL = MoELaunchConfig.from_dict({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 2,
                             "num_warps": 4, "num_stages": 2})
WIDE = MoELaunchConfig.from_dict({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 1,
                            "num_warps": 4, "num_stages": 2,
                            "down": {"BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 4, "num_warps": 4,
                                     "num_stages": 2}})
FUSED = MoELaunchConfig.from_dict({**SMALL.to_dict(), "FUSED_GATE_UP": True})  # one interleaved gate|up tile, one dot


def routing(gen: torch.Generator, T: int, G: int, K: int, mode: str = "rand") -> torch.Tensor:
    """topk ids [T, K] over G experts: distinct per token, or every token on expert 0 first ('one')."""
    if T == 0:
        return torch.zeros(0, K, dtype=torch.long)
    ids = torch.stack([torch.randperm(G, generator=gen)[:K] for _ in range(T)])
    if mode == "one" and K > 1:  # expert 0 first, the rest drawn from 1..G-1
        ids[:, 0] = 0
        ids[:, 1:] = torch.stack([torch.randperm(G - 1, generator=gen)[: K - 1] + 1 for _ in range(T)])
    elif mode == "one":
        ids[:, 0] = 0
    return ids


def expert_map(gen: torch.Generator, G: int, E: int) -> torch.Tensor:
    """Global → local map holding E of G experts (scattered), -1 elsewhere."""
    m = torch.full((G,), -1, dtype=torch.int32)
    m[torch.randperm(G, generator=gen)[:E]] = torch.arange(E, dtype=torch.int32)
    return m
