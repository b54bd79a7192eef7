"""Chunked local attention as metadata (kernels/attention_chunks.py): a step's sequences split into one virtual
sequence per attention chunk, run by the paged attention kernels unchanged, against the definition (transformers'
chunked_overlay: the query at position p sees keys [floor(p / C) * C, p]) computed densely here in float64. Mixed
steps (decode rows beside prompt chunks that start inside a chunk and cross several), a decode-only step (its virtual
sequences from the device lengths alone), chunks of one and of two blocks; the reference, the CPU kernels and, on a
GPU, Triton's."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.attention import AttentionMetadata, reference_paged_attention
from moelink.kernels.attention_chunks import chunked_metadata
from moelink.kernels.step_memo import STEP_MEMO

N, K, H = 4, 2, 8


def _step(query_lens: list[int], seq_lens: list[int], block_size: int, device, seed: int = 0):
    """Random caches with each sequence's context written at its (shuffled) blocks, q for the step's tokens, the
    metadata."""
    g = torch.Generator().manual_seed(seed)
    M = max(-(-n // block_size) for n in seq_lens)
    B = M * len(seq_lens)
    k_cache = torch.randn(B + 1, block_size, K, H, generator=g, dtype=torch.float64)
    v_cache = torch.randn(B + 1, block_size, K, H, generator=g, dtype=torch.float64)
    k_cache[B] = v_cache[B] = 0  # the null block
    tables = torch.randperm(B, generator=g)[: len(seq_lens) * M].view(len(seq_lens), M).to(torch.int32)
    T = sum(query_lens)
    q = torch.randn(T, N, H, generator=g, dtype=torch.float64)
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0).tolist()), dtype=torch.int32)
    slots = []
    for s, (qlen, ctx) in enumerate(zip(query_lens, seq_lens)):
        for p in range(ctx - qlen, ctx):
            slots.append(int(tables[s, p // block_size]) * block_size + p % block_size)
    meta = AttentionMetadata(qsl.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device),
                             tables.to(device), torch.tensor(slots, dtype=torch.long, device=device), list(query_lens),
                             list(seq_lens), max(query_lens), max(seq_lens), null_block=B)
    return q.to(device), k_cache.to(device), v_cache.to(device), meta


def _chunked_oracle(q, k_cache, v_cache, meta: AttentionMetadata, chunk: int, scale: float) -> torch.Tensor:
    """Each query against the keys of its own chunk up to itself, gathered position by position (float64)."""
    L = k_cache.shape[1]
    out = torch.empty_like(q)
    row = 0
    for s, (qlen, ctx) in enumerate(zip(meta.query_lens, meta.seq_lens)):
        table = meta.block_tables_SM[s].long()
        for p in range(ctx - qlen, ctx):
            pos = torch.arange((p // chunk) * chunk, p + 1)
            blocks = table[pos // L]
            k = k_cache[blocks, pos % L].repeat_interleave(N // K, dim=1)  # [C, N, H]
            v = v_cache[blocks, pos % L].repeat_interleave(N // K, dim=1)
            w = torch.softmax(torch.einsum("nh,cnh->nc", q[row], k) * scale, dim=-1)
            out[row] = torch.einsum("nc,cnh->nh", w, v)
            row += 1
    return out


# (query lens, seq lens): decode rows at a chunk's first and last position and inside one; prompt chunks that start
# inside a chunk and cross several, a fresh prompt, one that ends on a chunk boundary.
MIXED = ([1, 13, 20, 1, 1, 16], [18, 18, 20, 8, 9, 32])
DECODE = ([1, 1, 1, 1], [1, 8, 9, 27])


@pytest.mark.parametrize("block_size,chunk", [(4, 8), (8, 8), (2, 8)])
@pytest.mark.parametrize("lens", [MIXED, DECODE], ids=["mixed", "decode"])
def test_reference_on_chunked_metadata(block_size, chunk, lens):
    STEP_MEMO.clear()
    q, kc, vc, meta = _step(*lens, block_size, torch.device("cpu"))
    got = reference_paged_attention(q, kc, vc, chunked_metadata(meta, chunk, block_size), 0.3)
    torch.testing.assert_close(got, _chunked_oracle(q, kc, vc, meta, chunk, 0.3), rtol=1e-12, atol=1e-12)


def test_cpu_kernels_on_chunked_metadata():
    """The CPU kernel strategy (its native attention where built, else the reference) in float32, and the
    batch-invariant one."""
    from moelink.kernels.ops import BatchInvariantKernels, select_kernels

    STEP_MEMO.clear()
    q, kc, vc, meta = _step(*MIXED, 4, torch.device("cpu"), seed=3)
    want = _chunked_oracle(q, kc, vc, meta, 8, 0.3)
    for kernels in (select_kernels(torch.device("cpu")), BatchInvariantKernels()):
        got = kernels.paged_attention(q.float(), kc.float(), vc.float(), chunked_metadata(meta, 8, 4), 0.3)
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_metadata_of_a_decode_step_is_device_only():
    """A decode step's virtual sequences keep the step's query starts and derive lengths and tables from the device
    lengths (a decode graph captures them; a padding row of length 0 stays empty)."""
    STEP_MEMO.clear()
    _, _, _, meta = _step([1, 1, 1], [9, 17, 8], 4, torch.device("cpu"))
    meta.seq_lens_S[2] = 0  # a padding row
    v = chunked_metadata(meta, 8, 4)
    assert v.query_start_loc_S1 is meta.query_start_loc_S1
    assert v.seq_lens_S.tolist() == [1, 1, 0] and v.seq_lens == [8, 8, 8]
    assert torch.equal(v.block_tables_SM[0, :1], meta.block_tables_SM[0, 2:3])
    assert torch.equal(v.block_tables_SM[1, :1], meta.block_tables_SM[1, 4:5])


def test_block_size_must_divide_the_chunk():
    _, _, _, meta = _step([1], [5], 4, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"block_size=4 to divide attention_chunk_size=6"):
        chunked_metadata(meta, 6, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", [MIXED, DECODE], ids=["mixed", "decode"])
def test_triton_on_chunked_metadata(dtype, lens):
    from moelink.kernels.triton_attention import triton_paged_attention

    STEP_MEMO.clear()
    dev = torch.device("cuda")
    q, kc, vc, meta = _step(*lens, 16, dev, seed=5)
    want = _chunked_oracle(q.cpu(), kc.cpu(), vc.cpu(), _cpu(meta), 16, 0.3)
    for splits in (None, 1, 3):
        got = triton_paged_attention(q.to(dtype), kc.to(dtype), vc.to(dtype), chunked_metadata(meta, 16, 16), 0.3,
                                     num_splits=splits)
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
        torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)


def _cpu(meta: AttentionMetadata) -> AttentionMetadata:
    import dataclasses

    return dataclasses.replace(meta, query_start_loc_S1=meta.query_start_loc_S1.cpu(),
                               seq_lens_S=meta.seq_lens_S.cpu(), block_tables_SM=meta.block_tables_SM.cpu(),
                               slot_mapping_T=meta.slot_mapping_T.cpu())
