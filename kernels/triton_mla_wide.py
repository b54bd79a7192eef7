"""Prefill chunks over an fp8 latent cache: each context row widened once per chunk, not once per query token.

Legend as in mla.py: S sequences, R = C + P values per cached row, L block size, M max blocks per sequence;
W workspace blocks.

Why (issue 27): the MLA kernel (triton_mla.py) runs one program per query token and head block, each walking
its token's whole context. Over an fp8 cache every program widened every e4m3 row it read to the query's
dtype, in registers, so a chunk of Q tokens over X cached rows converted about Q * X * R values (a
7,680-token prompt: ~3,800 conversions per row), with half the rows per tile the bf16 kernel takes (the fp8
config keeps the widened copy's registers in check): prefill over an fp8 cache measured 1.9x the bf16 time on
an H100, while decode (one token per sequence: each row converted once anyway) gained from half the bytes.

Here the context of every sequence with more than one query token is widened once: `_widen_kernel` copies its
blocks, rows [0, seq_len) only, from the fp8 cache into a workspace cache of the query's dtype ([W + 1, L, R],
exact: e4m3 is a subset of bf16 / fp16, and the per-layer scale stays folded into the attention kernel's
softmax scale and output), and the attention kernel reads that as it reads a bf16 cache (the bf16 launch
config, no conversion in its loop) through block tables that point into the workspace. Decode tokens keep
reading the fp8 cache. A chunk then costs the bf16 kernel's work plus X * R fp8 bytes read and X * R wide
values written per prefill sequence: one pass over its context, against the Q passes its tokens make anyway.

The workspace holds at most WIDE_ROWS_MAX rows (vLLM's MLA caps its context workspace at 128k tokens too):
prefill sequences are grouped in batch order into passes that fit (widen, then attend, the next pass reusing
the memory in stream order); a sequence whose context alone is longer reads the fp8 cache directly (correct,
slower). No device->host sync: the plan reads the metadata's host lists; its small index tensors go to the
device from pinned memory without a wait.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import triton
import triton.language as tl

from . import triton_common as common
from .attention import AttentionMetadata

WIDE_ROWS_MAX = 128 * 1024  # workspace rows per pass: 151 MB of bf16 at DeepSeek's R = 576


@dataclass(frozen=True)
class WidePlan:
    """Which sequences of a batch read the fp8 cache as it is (`direct`: decodes, and contexts longer than a
    workspace) and which are widened, pass by pass: per pass, (sequence, its first workspace block) pairs."""

    direct: tuple[int, ...]
    passes: tuple[tuple[tuple[int, int], ...], ...]


def plan_wide(query_lens: list[int], seq_lens: list[int], block_size: int, max_rows: int) -> WidePlan:
    """The passes of one batch (host lists only), sequences in batch order, each pass at most max_rows rows."""
    direct: list[int] = []
    passes: list[tuple[tuple[int, int], ...]] = []
    current: list[tuple[int, int]] = []
    used = 0  # blocks of the current pass
    max_blocks = max_rows // block_size
    for s, (q, n) in enumerate(zip(query_lens, seq_lens)):
        blocks = -(-n // block_size)
        if q <= 1 or blocks > max_blocks:
            direct.append(s)
            continue
        if used + blocks > max_blocks:
            passes.append(tuple(current))
            current, used = [], 0
        current.append((s, used))
        used += blocks
    if current:
        passes.append(tuple(current))
    return WidePlan(tuple(direct), tuple(passes))


@triton.jit
def _widen_kernel(cache_ptr, tables_ptr, seq_lens_ptr, pairs_ptr, wide_ptr, stride_cb, stride_cl, stride_tb, stride_wb,
                  stride_wl, R, L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr):
    # Program (i, j): block j of the pass's i-th sequence (pairs_ptr: [sequence, first workspace block] each).
    i = tl.program_id(0)
    j = tl.program_id(1)
    s = tl.load(pairs_ptr + 2 * i)
    n = tl.load(seq_lens_ptr + s)
    if j * L < n:
        src = tl.load(tables_ptr + s.to(tl.int64) * stride_tb + j).to(tl.int64) * stride_cb
        dst = (tl.load(pairs_ptr + 2 * i + 1) + j).to(tl.int64) * stride_wb
        rows = tl.arange(0, BLOCK_L)
        # Rows at or past the sequence's length stay unwritten: the attention kernel never reads them.
        row_ok = (rows < L) & (j * L + rows < n)
        for r0 in range(0, R, BLOCK_R):
            cols = r0 + tl.arange(0, BLOCK_R)
            m = row_ok[:, None] & (cols[None, :] < R)
            v = tl.load(cache_ptr + src + rows[:, None] * stride_cl + cols[None, :], mask=m)
            tl.store(wide_ptr + dst + rows[:, None] * stride_wl + cols[None, :], v.to(wide_ptr.dtype.element_ty),
                     mask=m)


def _row_tile(R: int) -> int:
    """Columns per step of the widen kernel: a power of two dividing R when one of 32..256 does (R = 576: 64, so
    no lane is masked), else R rounded up to a power of two (at most 256)."""
    tile = math.gcd(R, 256)
    return tile if tile >= 32 else min(256, triton.next_power_of_2(R))


def _index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """int32 on `device` without making the host wait (pinned memory and a non-blocking copy on CUDA: a pageable
    copy would synchronise the stream)."""
    t = torch.as_tensor(np.asarray(values, dtype=np.int32))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def sources(latent_cache_BLR: torch.Tensor, meta: AttentionMetadata,
            dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """What the attention kernel reads for a batch over an fp8 cache, launch by launch: (cache, block tables
    [S, M'], selected sequences: int32 [S], >= 0 for the sequences this launch serves, or None for all). First
    the fp8 cache for the direct sequences, then per pass a freshly widened workspace in `dtype`; each pass's
    workspace is made after the previous launch was issued, so consume them in order."""
    S, L, R = meta.num_seqs, latent_cache_BLR.shape[1], latent_cache_BLR.shape[2]
    dev = latent_cache_BLR.device
    plan = plan_wide(meta.query_lens, meta.seq_lens, L, WIDE_ROWS_MAX)
    if plan.direct:
        direct = set(plan.direct)
        sel = None if len(direct) == S else _index_tensor([0 if s in direct else -1 for s in range(S)], dev)
        yield latent_cache_BLR, meta.block_tables_SM, sel
    for pairs in plan.passes:
        blocks = [-(-meta.seq_lens[s] // L) for s, _ in pairs]
        base = [-1] * S
        for s, first in pairs:
            base[s] = first
        # One copy for the kernel's pairs and the sequences' first blocks ([2n + S] int32, sliced on the device).
        idx = _index_tensor([v for pair in pairs for v in pair] + base, dev)
        pairs_P2, base_S = idx[: 2 * len(pairs)], idx[2 * len(pairs):]
        wide = common.workspace((sum(blocks), L, R), dtype, dev)
        _widen_kernel[(len(pairs), max(blocks))](
            latent_cache_BLR, meta.block_tables_SM, meta.seq_lens_S, pairs_P2, wide, latent_cache_BLR.stride(0),
            latent_cache_BLR.stride(1), meta.block_tables_SM.stride(0), wide.stride(0), wide.stride(1), R, L=L,
            BLOCK_L=triton.next_power_of_2(L), BLOCK_R=_row_tile(R), num_warps=4)
        # A served sequence's block j is workspace block base + j (its blocks are consecutive there).
        tables = base_S[:, None] + torch.arange(max(blocks), dtype=torch.int32, device=dev)[None, :]
        yield wide, tables, (None if len(pairs) == S else base_S)
