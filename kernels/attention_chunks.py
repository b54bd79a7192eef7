"""Chunked local attention over the paged KV cache as metadata: each sequence's queries split into one virtual
sequence per attention chunk, whose context starts at its chunk's first block (Llama 4's attention_chunk_size:
the query at position p sees keys [floor(p / C) * C, p] only, transformers' chunked_overlay).

Why metadata and not a kernel argument: a virtual sequence is plain causal attention over its chunk, so every
paged attention kernel (the reference, the CPU one, Triton's prefill and decode, the batch-invariant ones) runs
chunked attention unchanged, and no kernel grows a mask mode (vLLM's local attention does the same: its "virtual
batches"). It needs the chunk to start at a block boundary: the block size divides C (GQAConfig.check_block_size).

Legend: S sequences, V virtual sequences, M max blocks per sequence, C the chunk size, L the block size.

A sequence of one query token (decode, a drafter's chained step) is one virtual sequence whose length and first
block come from the device lengths `seq_lens_S` (no host sync: decode graphs capture it, and the host length of such
a row may be an upper bound, AttentionMetadata). A sequence of several query tokens (a prompt chunk, a verify step)
is split on the host by its exact host length, one virtual sequence per chunk its queries reach; its rows stay in
the flat batch's order, so the output needs no reordering. Such a split depends on the step's positions, so it is
never captured in a CUDA graph: a verify graph's capture fails here, and speculative verify steps run eagerly
(engine/rank/cuda_graph.py drops the verify graphs and keeps the decode ones).
"""
from __future__ import annotations

import dataclasses

import torch

from .attention import AttentionMetadata
from .step_memo import STEP_MEMO


def chunked_metadata(meta: AttentionMetadata, chunk: int, block_size: int) -> AttentionMetadata:
    """`meta` as virtual sequences, one per (sequence, attention chunk its queries reach), each attending causally
    within its chunk. Memoized per step (kernels/step_memo.py): the model's chunked layers share one."""
    if chunk % block_size:
        raise ValueError(f"chunked attention needs block_size={block_size} to divide attention_chunk_size={chunk}.")
    return STEP_MEMO.get("attention_chunks", (meta.seq_lens_S, meta.block_tables_SM, meta.query_start_loc_S1),
                         (chunk, block_size, tuple(meta.query_lens), tuple(meta.seq_lens)),
                         lambda: _virtual(meta, chunk, block_size))


def _virtual(meta: AttentionMetadata, chunk: int, block_size: int) -> AttentionMetadata:
    dev = meta.seq_lens_S.device
    if all(n == 1 for n in meta.query_lens):  # decode: one virtual row per sequence, on the device alone
        end_V = meta.seq_lens_S.long()
        return _with_ends(meta, end_V, None, meta.query_start_loc_S1, list(meta.query_lens),
                          [min(n, chunk) for n in meta.seq_lens], chunk, block_size)
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Its split depends on the step's positions: a graph captured for one step's would replay it for another.
        raise RuntimeError("chunked attention is not captured for steps of several query tokens per sequence (a "
                           "verify graph): those steps run eagerly")
    src, ends, qlens, hlens = [], [], [], []
    decode = []
    for s, (qlen, ctx) in enumerate(zip(meta.query_lens, meta.seq_lens)):
        if qlen == 1:  # its device length decides (its host one may be an upper bound)
            pieces = [(0, 1, min(ctx, chunk), True)]
        else:
            pieces = []
            p = ctx - qlen  # the first query's position
            while p < ctx:
                stop = min(ctx, (p // chunk + 1) * chunk)  # past this chunk's last query
                pieces.append((stop, stop - p, stop - (p // chunk) * chunk, False))
                p = stop
        for end, n, host_len, dec in pieces:  # (last query + 1, queries, host length, from the device)
            src.append(s)
            ends.append(end)
            qlens.append(n)
            hlens.append(host_len)
            decode.append(dec)
    src_V = torch.tensor(src, dtype=torch.long, device=dev)
    end_V = torch.tensor(ends, dtype=torch.long, device=dev)
    if any(decode):
        dec_V = torch.tensor(decode, dtype=torch.bool, device=dev)
        end_V = torch.where(dec_V, meta.seq_lens_S.long().index_select(0, src_V), end_V)
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    qsl_V1 = torch.tensor(qsl, dtype=meta.query_start_loc_S1.dtype, device=dev)
    return _with_ends(meta, end_V, src_V, qsl_V1, qlens, hlens, chunk, block_size)


def _with_ends(meta: AttentionMetadata, end_V: torch.Tensor, src_V: torch.Tensor | None, qsl_V1: torch.Tensor,
               query_lens: list[int], seq_lens: list[int], chunk: int, block_size: int) -> AttentionMetadata:
    """The virtual sequences whose last query sits at end_V - 1 (long [V]; 0: a padding row of a decode graph),
    of the sequences `src_V` (None: one per sequence, in order): length end - chunk start, block table from the
    chunk's first block (the columns past the table's end read its last entry, past every length)."""
    tables_SM = meta.block_tables_SM if src_V is None else meta.block_tables_SM.index_select(0, src_V)
    M = tables_SM.shape[1]
    first_V = torch.where(end_V > 0, (end_V - 1) // chunk, 0) * chunk  # the chunk's first position
    cols_VM = (first_V // block_size)[:, None] + torch.arange(M, device=end_V.device)[None, :]
    tables_VM = tables_SM.gather(1, cols_VM.clamp(max=M - 1).to(torch.long)).contiguous()
    seq_lens_V = (end_V - first_V).to(meta.seq_lens_S.dtype)
    return dataclasses.replace(meta, query_start_loc_S1=qsl_V1, seq_lens_S=seq_lens_V, block_tables_SM=tables_VM,
                               query_lens=query_lens, seq_lens=seq_lens, max_query_len=max(query_lens),
                               max_seq_len=max(seq_lens))


__all__ = ["chunked_metadata"]
