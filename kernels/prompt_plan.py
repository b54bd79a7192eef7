"""Which of a step's prompt chunks the plain-torch paged attention runs together, and how it gathers them
(kernels/attention.py runs the attention over what is gathered here).

Legend: G sequences of a group, Q its padded query length (= its context: a fresh prompt's keys are its queries),
K kv heads, H head dim, L block size, m blocks per sequence.

A chunk with no cached prefix (its context is its own tokens: a prompt's first or only chunk, no prefix-cache hit)
is plain causal attention over its own keys. Run one by one, a step of 64 such prompts is 64 key gathers and 64
SDPA calls a layer, each a few microseconds of work behind tens of dispatch: on a CPU the prompt step of a busy
server spent a third of its attention time there. Sorted by length, they are grouped while padding each to the
group's longest costs at most `PAD_WORK` times the attention work of the exact lengths (equal lengths: no padding
at all), and each group is one gather of whole cache blocks and one causal SDPA call. A padded query row repeats
its sequence's last real row and its output is dropped; a padded key position is zero (the null block past a
sequence's blocks, zeroed in its last block), so no stale or NaN cache content reaches a real row through the
kernel's masked products. The plans are the step's: its first layer builds them, the others reuse them
(kernels/step_memo.py). CPU only: other devices run the Triton kernel, whose
program per sequence has no dispatch to save.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .cpu_reads import cpu_nonzero
from .decode_plan import GroupPlan
from .step_memo import STEP_MEMO

if TYPE_CHECKING:
    from .attention import AttentionMetadata

# A group's padded attention work (sum over its rows of the keys each reads, ~ G * Q^2) over the exact work, at most.
PAD_WORK = 1.25
# Padded query rows of one group, at most (bounds the padded copies of q and of the output).
MAX_GROUP_ROWS = 16384


@dataclass
class PromptGroup:
    """One group of fresh prompt chunks (module docstring): `seqs` its sequences and `width` their padded length Q;
    `rows_X` the flat batch row each padded query row reads (X = G * Q), `keep_Y` which padded rows are real (None:
    all) and `out_Y` their flat batch rows; `keys` the decode groups' block gather (kernels/decode_plan.py
    `GroupPlan`: G * m whole blocks, the stale positions of each sequence's last block zeroed), of which the first Q
    positions are the group's keys and values."""

    seqs: list[int]
    width: int
    first_row: int | None  # equal lengths, consecutive in the batch: the padded rows are rows [first_row, + G * Q)
    rows_X: torch.Tensor
    keep_Y: torch.Tensor | None
    out_Y: torch.Tensor
    keys: GroupPlan


def fresh_prompts(meta: "AttentionMetadata", chunk_seqs: list[int]) -> list[int]:
    """The chunk sequences whose context is exactly this step's tokens (no cached prefix)."""
    return [s for s in chunk_seqs if meta.seq_lens[s] == meta.query_lens[s]]


def prompt_groups(meta: "AttentionMetadata", seqs: list[int], starts: list[int], block_size: int,
                  device: torch.device) -> list[PromptGroup]:
    """The step's groups of two or more of the fresh prompt chunks `seqs` (a sequence alone in its group runs as
    before), on a CPU (the stale positions are read on the host: kernels/cpu_reads.py; elsewhere the Triton kernel
    runs): built by the step's first layer, reused by the others."""
    return STEP_MEMO.get("prompt_groups", (meta.seq_lens_S, meta.block_tables_SM, meta.query_start_loc_S1),
                         (block_size, meta.null_block, tuple(seqs)),
                         lambda: _groups(meta, seqs, starts, block_size, device))


def group_by_padding(lengths: list[int]) -> list[list[int]]:
    """Indices into `lengths` grouped as the module docstring says: ascending length, each group extended while
    its padded work (size x longest^2) stays within PAD_WORK of its exact work (sum of squares) and its padded rows
    within MAX_GROUP_ROWS."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    exact = 0
    for i in order:
        n = lengths[i]
        if groups:
            g = groups[-1]
            if (len(g) + 1) * n * n <= PAD_WORK * (exact + n * n) and (len(g) + 1) * n <= MAX_GROUP_ROWS:
                g.append(i)
                exact += n * n
                continue
        groups.append([i])
        exact = n * n
    return groups


def _groups(meta, seqs: list[int], starts: list[int], block_size: int, device) -> list[PromptGroup]:
    out = []
    for idx in group_by_padding([meta.query_lens[s] for s in seqs]):
        if len(idx) < 2:
            continue
        group = [seqs[i] for i in idx]
        lens = [meta.query_lens[s] for s in group]
        Q = lens[-1]
        m = -(-Q // block_size)
        G = len(group)
        seq_idx_G = torch.tensor(group, device=device, dtype=torch.long)
        lens_G1 = torch.tensor(lens, device=device, dtype=torch.long)[:, None]
        starts_G1 = torch.tensor([starts[s] for s in group], device=device, dtype=torch.long)[:, None]
        pos_Q = torch.arange(Q, device=device)
        rows_GQ = starts_G1 + torch.minimum(pos_Q[None, :], lens_G1 - 1)
        if all(n == Q for n in lens):
            keep_Y, out_Y = None, rows_GQ.reshape(-1)
            first = starts[group[0]]
            consecutive = all(starts[s] == first + i * Q for i, s in enumerate(group))
        else:
            real_X = (pos_Q[None, :] < lens_G1).reshape(-1)
            keep_Y = cpu_nonzero(real_X)
            out_Y = rows_GQ.reshape(-1).index_select(0, keep_Y)
            consecutive = False
        blocks_G1 = (lens_G1 + block_size - 1) // block_size
        tables_Gm = meta.block_tables_SM.index_select(0, seq_idx_G)[:, :m].long()
        blocks_Gm = torch.where(torch.arange(m, device=device)[None, :] < blocks_G1, tables_Gm, meta.null_block)
        pos_C = torch.arange(m * block_size, device=device)
        valid_GC = pos_C[None, :] < lens_G1
        stale_W = cpu_nonzero(((pos_C[None, :] < blocks_G1 * block_size) & ~valid_GC).reshape(-1))
        keys = GroupPlan(None, valid_GC, blocks_X=blocks_Gm.reshape(-1), stale_Y=stale_W if stale_W.numel() else None)
        out.append(PromptGroup(group, Q, starts[group[0]] if consecutive else None, rows_GQ.reshape(-1), keep_Y,
                               out_Y, keys))
    return out


__all__ = ["MAX_GROUP_ROWS", "PAD_WORK", "PromptGroup", "fresh_prompts", "group_by_padding", "prompt_groups"]
