"""Token alignment for the grouped expert GEMM: sort (token, expert) pairs by expert, pad each run to BLOCK_M.

Legend: T tokens, K top-k, P = T*K (token, expert) pairs (pair p = t*K + k),
E local experts, G global experts, R padded rows (a multiple of BLOCK_M),
B = R / BLOCK_M row blocks, C chunks of pairs, X = E rounded up to a power of two.

Worked layout (T=3, K=2, E=3, BLOCK_M=4, ids_TK = [[2,0],[0,1],[1,2]]):
    expert of each pair p=0..5:  [2, 0, 0, 1, 1, 2]
    sorted_ids_R   = [1, 2, 6, 6,  3, 4, 6, 6,  0, 5, 6, 6,  ...]   6 = P is the padding sentinel
    expert_ids_B   = [0, 1, 2, -1]                               -1: no work in this block
    num_rows_1     = [12]
Pairs keep ascending order inside an expert's run, so the result is deterministic.
Pairs whose expert is remote (expert_map -1), negative or out of range (>= E, or
>= G with a map) appear nowhere: the GEMMs never see them and the combine step
treats them as zero.

R is a bound known on the host from shapes alone, never from the routing:
each of the at most min(E, P) non-empty experts wastes fewer than BLOCK_M rows,
so R = roundup(P + min(E, P) * (BLOCK_M - 1), BLOCK_M). That is what lets the
GEMM grids be sized without a device→host sync; blocks past the used rows carry
expert id -1 and their programs exit at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Host-side bound on the padded row count (see the module docstring)."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return triton.cdiv(rows, block_m) * block_m


def _local_ids(topk_ids_TK: torch.Tensor, expert_map_G: torch.Tensor | None) -> torch.Tensor:
    ids_P = topk_ids_TK.reshape(-1).long()
    if expert_map_G is None:
        return ids_P
    mapped_P = expert_map_G.long()[ids_P.clamp(min=0)]
    return torch.where(ids_P >= 0, mapped_P, torch.full_like(ids_P, -1))


def reference_moe_align_block_size(
    topk_ids_TK: torch.Tensor, block_m: int, num_experts: int, expert_map_G: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch oracle of the alignment (host syncs allowed: it loops over experts).

    Returns (sorted_ids_R int32, expert_ids_B int32, num_rows_1 int32), laid out
    as in the module docstring.
    """
    num_pairs = topk_ids_TK.numel()
    local_P = _local_ids(topk_ids_TK, expert_map_G).cpu()  # host sync: the oracle loops on the host
    R = max_padded_rows(num_pairs, num_experts, block_m)
    sorted_ids_R = torch.full((R,), num_pairs, dtype=torch.int32)
    expert_ids_B = torch.full((R // block_m,), -1, dtype=torch.int32)
    row = 0
    for e in range(num_experts):
        pairs_n = (local_P == e).nonzero().flatten()
        n = pairs_n.numel()
        if n == 0:
            continue
        sorted_ids_R[row : row + n] = pairs_n.to(torch.int32)
        blocks = triton.cdiv(n, block_m)
        expert_ids_B[row // block_m : row // block_m + blocks] = e
        row += blocks * block_m
    dev = topk_ids_TK.device
    return sorted_ids_R.to(dev), expert_ids_B.to(dev), torch.tensor([row], dtype=torch.int32, device=dev)


@triton.jit
def _local_expert(ids_ptr, map_ptr, offs, num_pairs, num_ids, HAS_MAP: tl.constexpr):
    """Local expert of each pair in `offs`; -1 where remote, negative, out of range or past the end.

    `num_ids` bounds the ids: the map's length G with a map, else E. An id outside it would
    otherwise index past the map, or get rows (and expert weights) that do not exist."""
    inb = offs < num_pairs
    raw = tl.load(ids_ptr + offs, mask=inb, other=-1)
    # Range-check before narrowing: an int64 id >= 2**31 must not wrap onto a real expert.
    e = tl.where((raw >= 0) & (raw < num_ids), raw, -1).to(tl.int32)
    if HAS_MAP:
        e = tl.load(map_ptr + e, mask=inb & (e >= 0), other=-1).to(tl.int32)
    return e


@triton.jit
def _chunk_histogram(ids_ptr, map_ptr, chunk, num_pairs, num_ids, CHUNK: tl.constexpr, SUB: tl.constexpr,
                     X: tl.constexpr, HAS_MAP: tl.constexpr):
    lanes_X = tl.arange(0, X)
    hist_X = tl.zeros([X], dtype=tl.int32)
    for s in range(0, CHUNK, SUB):
        offs = chunk * CHUNK + s + tl.arange(0, SUB)
        e = _local_expert(ids_ptr, map_ptr, offs, num_pairs, num_ids, HAS_MAP)
        hist_X += tl.sum((e[:, None] == lanes_X[None, :]).to(tl.int32), axis=0)
    return hist_X


@triton.jit(do_not_specialize=["num_pairs"])
def _align_count_kernel(ids_ptr, map_ptr, counts_CX_ptr, num_pairs, num_ids,
                        CHUNK: tl.constexpr, SUB: tl.constexpr, X: tl.constexpr, HAS_MAP: tl.constexpr):
    c = tl.program_id(0)
    hist_X = _chunk_histogram(ids_ptr, map_ptr, c, num_pairs, num_ids, CHUNK, SUB, X, HAS_MAP)
    tl.store(counts_CX_ptr + c * X + tl.arange(0, X), hist_X)


# Sizes that change with the batch are not specialised on, so a new decode batch size rarely compiles.
@triton.jit(do_not_specialize=["num_pairs", "num_chunks", "num_blocks"])
def _align_scatter_kernel(ids_ptr, map_ptr, counts_CX_ptr, sorted_ptr, expert_ids_ptr, num_rows_ptr,
                          num_pairs, num_ids, num_chunks, num_blocks,
                          BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, X: tl.constexpr,
                          CB: tl.constexpr, NB: tl.constexpr, HAS_MAP: tl.constexpr, SINGLE: tl.constexpr):
    c = tl.program_id(0)
    lanes_X = tl.arange(0, X)
    # Pairs per expert in all chunks (total) and in the chunks before this one (before).
    if SINGLE:
        total_X = _chunk_histogram(ids_ptr, map_ptr, 0, num_pairs, num_ids, CHUNK, SUB, X, HAS_MAP)
        before_X = tl.zeros([X], dtype=tl.int32)
    else:
        total_X = tl.zeros([X], dtype=tl.int32)
        before_X = tl.zeros([X], dtype=tl.int32)
        for c0 in range(0, num_chunks, CB):
            rows_b = c0 + tl.arange(0, CB)
            h_bX = tl.load(counts_CX_ptr + rows_b[:, None] * X + lanes_X[None, :], mask=rows_b[:, None] < num_chunks, other=0)
            total_X += tl.sum(h_bX, axis=0)
            before_X += tl.sum(h_bX * (rows_b[:, None] < c).to(tl.int32), axis=0)
    padded_X = (total_X + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end_X = tl.cumsum(padded_X, axis=0)
    start_X = end_X - padded_X
    # Scatter this chunk's pairs. A pair's row = its expert's start + pairs of that
    # expert in earlier chunks + its rank among them in this chunk (a one-hot scan:
    # no atomics, so the order is deterministic).
    next_X = start_X + before_X
    for s in range(0, CHUNK, SUB):
        offs = c * CHUNK + s + tl.arange(0, SUB)
        e = _local_expert(ids_ptr, map_ptr, offs, num_pairs, num_ids, HAS_MAP)
        onehot_sX = (e[:, None] == lanes_X[None, :]).to(tl.int32)
        rank_s = tl.sum(tl.cumsum(onehot_sX, axis=0) * onehot_sX, axis=1) - 1
        row_s = tl.sum(onehot_sX * next_X[None, :], axis=1) + rank_s
        tl.store(sorted_ptr + row_s, offs, mask=e >= 0)
        next_X += tl.sum(onehot_sX, axis=0)
    # Row blocks, shared out over the programs: each block's expert, and the
    # sentinel in the padding tail of each expert's last block.
    fill_X = start_X + total_X
    for b0 in range(c * NB, num_blocks, num_chunks * NB):
        blk_b = b0 + tl.arange(0, NB)
        row0_b = blk_b * BLOCK_M
        in_bX = ((row0_b[:, None] >= start_X[None, :]) & (row0_b[:, None] < end_X[None, :])).to(tl.int32)
        has_b = tl.sum(in_bX, axis=1) > 0
        expert_b = tl.where(has_b, tl.sum(in_bX * lanes_X[None, :], axis=1), -1)
        tl.store(expert_ids_ptr + blk_b, expert_b, mask=blk_b < num_blocks)
        fill_b = tl.sum(in_bX * fill_X[None, :], axis=1)
        rows_bm = row0_b[:, None] + tl.arange(0, BLOCK_M)[None, :]
        sentinel_bm = tl.zeros([NB, BLOCK_M], dtype=tl.int32) + num_pairs
        tl.store(sorted_ptr + rows_bm, sentinel_bm, mask=has_b[:, None] & (rows_bm >= fill_b[:, None]))
    if c == 0:
        tl.store(num_rows_ptr, tl.max(end_X, axis=0))


# Up to this many sub-tiles of pairs, one program does everything (one launch:
# decode). Above it, a count kernel and a scatter kernel over chunks.
_SINGLE_MAX_SUBTILES = 4
_MAX_CHUNKS = 256


def align_launch(num_pairs: int, num_experts: int) -> tuple[bool, int, int, int]:
    """(SINGLE, CHUNK, SUB, X), the alignment kernels' compile-time sizes for `num_pairs` > 0 pairs: what a
    new batch size may change (start-up warm-up compiles each: kernels/moe_variants.py). Host arithmetic."""
    X = max(16, triton.next_power_of_2(num_experts))
    # One-hot tiles are [SUB, X]: keep them near 8K elements whatever E is.
    SUB = max(16, min(256, 8192 // X, triton.next_power_of_2(num_pairs)))
    n_sub = triton.cdiv(num_pairs, SUB)
    # From 512 expert columns on (Kimi K2's 384), the one-program kernel's [X] vectors beside its tiles spilled on
    # sm_90 (4 bytes at 8 warps, compile report): two launches there, as for larger batches.
    single = n_sub <= _SINGLE_MAX_SUBTILES and X < 512
    return single, SUB * (n_sub if single else triton.cdiv(n_sub, _MAX_CHUNKS)), SUB, X


def moe_align_block_size(
    topk_ids_TK: torch.Tensor, block_m: int, num_experts: int, expert_map_G: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same outputs as `reference_moe_align_block_size`, computed on the device with no host sync.

    One kernel launch for small batches, two for large ones. topk_ids_TK: any
    integer dtype; expert_map_G: int [G] (local index or -1), optional.
    """
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} is invalid: must be a power of two.")
    dev = topk_ids_TK.device
    common.interpreting(topk_ids_TK)  # raises a clear error for CPU tensors without the interpreter
    num_pairs = topk_ids_TK.numel()
    R = max_padded_rows(num_pairs, num_experts, block_m)
    B = R // block_m
    sorted_ids_R = common.workspace((R,), torch.int32, dev)
    expert_ids_B = common.workspace((B,), torch.int32, dev)
    num_rows_1 = common.workspace((1,), torch.int32, dev)
    if num_pairs == 0:
        num_rows_1.zero_()
        return sorted_ids_R, expert_ids_B, num_rows_1
    ids_P = topk_ids_TK.reshape(-1)
    if not ids_P.is_contiguous():
        ids_P = ids_P.contiguous()
    single, chunk, SUB, X = align_launch(num_pairs, num_experts)
    C = triton.cdiv(num_pairs, chunk)
    has_map = expert_map_G is not None
    map_G = expert_map_G if has_map else ids_P  # any pointer: unused without a map
    num_ids = expert_map_G.numel() if has_map else num_experts
    counts_CX = common.workspace((C, X), torch.int32, dev) if not single else num_rows_1
    if not single:
        _align_count_kernel[(C,)](ids_P, map_G, counts_CX, num_pairs, num_ids, CHUNK=chunk, SUB=SUB, X=X,
                                  HAS_MAP=has_map, num_warps=4)
    _align_scatter_kernel[(C,)](
        ids_P, map_G, counts_CX, sorted_ids_R, expert_ids_B, num_rows_1, num_pairs, num_ids, C, B,
        BLOCK_M=block_m, CHUNK=chunk, SUB=SUB, X=X, CB=max(1, min(32, 8192 // X)), NB=16,
        HAS_MAP=has_map, SINGLE=single, num_warps=8,
    )
    return sorted_ids_R, expert_ids_B, num_rows_1
