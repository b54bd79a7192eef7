"""Page-balanced split plan for the decode kernels (paged attention, MLA), computed on the device.

Legend: S sequences, P work programs along the decode grid's first axis (per kv head / head block).

Why: a uniform split count Z cuts every sequence into Z parts, so a batch of one long and many short
contexts leaves the long one's Z programs doing nearly all the work; and a CUDA graph freezes whatever the
host chose at capture. Here P comes from the batch size, the heads and the SM count only
(`split_planning.decode_programs`), and the device divides those P programs among the sequences in
proportion to the key tiles each walks (BLOCK_N keys, aligned to multiples of BLOCK_N, hence to the cache's
pages when the block size divides BLOCK_N or is a multiple of it), at least one each:

    used      = min(P, max(S, tiles // 2))        (no program gets fewer than ~2 tiles on average)
    ends[s]   = (s + 1) + floor((used - S) * cum_tiles[s] / tiles)      (cum_tiles: inclusive prefix sum)

so ends[S - 1] == used, every share ends[s] - ends[s - 1] >= 1, and a share differs from its exact
proportion 1 + (used - S) * tiles_s / tiles by less than one. Programs p >= used exit at once. A program
finds its sequence by binary search over ends (as the prefill kernel searches query_start_loc) and takes
ceil(tiles_s / share) tiles of it; a share larger than the sequence's tile count leaves the tail splits
empty (they store lse = -inf and the merge weighs them 0).

A sequence whose query is not a single token (a prefill chunk in a mixed batch) weighs 0 tiles: it gets
exactly one program, which exits (the prefill kernel serves it). Nothing here reads a host length, so the
plan is the same in eager steps and in a replayed graph, whatever max_model_len is.

One plan a step, not one a layer: every layer of a step reads the same lengths, so the first layer's plan (per
program count, tile width and window) is the step's (kernels/step_memo.py). A decode step of a 48-layer model
launched 48 single-program plan kernels; in a captured graph it now launches one, whose output the other layers
read (at batch 1 on an H200 each such launch is ~2 us of a ~4.3 ms step).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .step_memo import STEP_MEMO


@triton.jit
def seq_tiles(seq_len, q_len, window, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """(first tile, tile count) of a decode query's keys [kv_lo, seq_len); tile t holds keys
    [t * BLOCK_N, (t + 1) * BLOCK_N). A non-decode row (q_len != 1) has 0 tiles."""
    kv_lo = seq_len * 0
    if WINDOW:
        kv_lo = tl.maximum(seq_len - window, 0)  # the query at seq_len - 1 sees keys > seq_len - 1 - window
    first = kv_lo // BLOCK_N
    tiles = tl.where(q_len == 1, tl.cdiv(seq_len, BLOCK_N) - first, 0)
    return first, tiles


@triton.jit
def _chunk_tiles(seq_lens_ptr, qsl_ptr, c, num_seqs, window, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                 WINDOW: tl.constexpr):
    """(sequence ids, in range, int64 key-tile counts with 0 out of range) of the BLOCK_S sequences from c."""
    s = c + tl.arange(0, BLOCK_S)
    ok = s < num_seqs
    seq_len = tl.load(seq_lens_ptr + s, mask=ok, other=1)
    q_len = tl.load(qsl_ptr + s + 1, mask=ok, other=1) - tl.load(qsl_ptr + s, mask=ok, other=0)
    _, tiles = seq_tiles(seq_len, q_len, window, BLOCK_N, WINDOW)
    return s, ok, tl.where(ok, tiles, 0).to(tl.int64)


@triton.jit(do_not_specialize=["num_seqs", "programs", "window"])
def _plan_kernel(seq_lens_ptr, qsl_ptr, ends_ptr, num_seqs, programs, window, BLOCK_N: tl.constexpr,
                 BLOCK_S: tl.constexpr, WINDOW: tl.constexpr):
    """One program: two passes over the sequences in BLOCK_S chunks (the tile total, then the prefix sum)."""
    total = num_seqs.to(tl.int64) * 0
    for c in range(0, num_seqs, BLOCK_S):
        _, _, tiles = _chunk_tiles(seq_lens_ptr, qsl_ptr, c, num_seqs, window, BLOCK_N, BLOCK_S, WINDOW)
        total += tl.sum(tiles, axis=0)
    used = tl.minimum(programs, tl.maximum(num_seqs, total // 2)).to(tl.int64)
    extra = used - num_seqs
    denom = tl.maximum(total, 1)
    carry = total * 0
    for c in range(0, num_seqs, BLOCK_S):
        s, ok, tiles = _chunk_tiles(seq_lens_ptr, qsl_ptr, c, num_seqs, window, BLOCK_N, BLOCK_S, WINDOW)
        cum = carry + tl.cumsum(tiles, axis=0)
        ends = s.to(tl.int64) + 1 + (extra * cum) // denom
        tl.store(ends_ptr + s, ends.to(tl.int32), mask=ok)
        carry += tl.sum(tiles, axis=0)


@triton.jit
def find_split(ends_ptr, num_seqs, p):
    """(sequence, split index within it, its share) of work program p; sequence == num_seqs when p is past
    the plan's last program (the caller exits)."""
    lo = p * 0  # int32 tensors from the start: loop-carried
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(ends_ptr + mid) <= p:
            lo = mid + 1
        else:
            hi = mid
    s_idx = lo
    start = tl.where(s_idx > 0, tl.load(ends_ptr + s_idx - 1, mask=(s_idx > 0) & (s_idx <= num_seqs), other=0), 0)
    end = tl.load(ends_ptr + s_idx, mask=s_idx < num_seqs, other=0)
    return s_idx, p - start, end - start


@triton.jit
def split_range(seq_len, kv_lo, first_tile, tiles, split, share, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) of split `split` of `share`: ceil(tiles / share) whole tiles from the sequence's first,
    clipped to [kv_lo, seq_len). Empty (lo >= hi) for the tail splits of a share above the tile count."""
    per = tl.cdiv(tiles, share)
    t0 = first_tile + split * per
    lo = tl.maximum(t0 * BLOCK_N, kv_lo)
    hi = tl.minimum((t0 + per) * BLOCK_N, seq_len)
    return lo, hi


def plan_decode_splits(seq_lens_S: torch.Tensor, query_start_loc_S1: torch.Tensor, programs: int, block_n: int,
                       window: int | None = None) -> torch.Tensor:
    """ends_S (int32, on the device): work program p serves the sequence s with ends[s-1] <= p < ends[s]
    (module docstring). One single-program launch; no host sync, so a CUDA graph can capture it."""
    S = seq_lens_S.shape[0]
    if programs < S:
        raise ValueError(f"programs={programs} is invalid: a plan needs at least one program per sequence ({S}).")

    def make() -> torch.Tensor:
        ends_S = common.workspace((S,), torch.int32, seq_lens_S.device)
        _plan_kernel[(1,)](seq_lens_S, query_start_loc_S1, ends_S, S, programs, window or 0, BLOCK_N=block_n,
                           BLOCK_S=min(1024, max(16, triton.next_power_of_2(S))), WINDOW=window is not None,
                           num_warps=4)
        return ends_S

    # The step's plan for these lengths (module docstring): the kernels only read it.
    return STEP_MEMO.get("decode_splits", (seq_lens_S, query_start_loc_S1), (programs, block_n, window), make)
