"""AttentionMetadata for tests that run one layer by hand over a paged KV cache (draft heads, MTP layers)."""
from __future__ import annotations

import torch

from moelink.kernels.attention import AttentionMetadata


def paged_meta(starts: list[int], lens: list[int], tables: list[list[int]], num_blocks: int,
               block: int) -> AttentionMetadata:
    """Sequences whose tokens [start, start + len) run in this step, each over its block table (`block` tokens a
    block; the null block is `num_blocks`)."""
    slots = [tables[s][q // block] * block + q % block for s, (a, n) in enumerate(zip(starts, lens))
             for q in range(a, a + n)]
    seq_lens = [a + n for a, n in zip(starts, lens)]
    M = max(map(len, tables))
    qsl = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    return AttentionMetadata(qsl, torch.tensor(seq_lens, dtype=torch.int32),
                             torch.tensor([tb + [0] * (M - len(tb)) for tb in tables], dtype=torch.int32),
                             torch.tensor(slots, dtype=torch.long), list(lens), seq_lens, max(lens), max(seq_lens),
                             null_block=num_blocks)
