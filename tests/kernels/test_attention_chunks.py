"""Chunked local attention as metadata (kernels/attention_chunks.py): a step's sequences split into one virtual
sequence per attention chunk, run by the paged attention kernels unchanged, against the definition (transformers'
chunked_overlay: the query at position p sees keys [floor(p / C) * C, p]) computed densely here in float64. Mixed
steps (decode rows beside prompt chunks that start inside a chunk and cross several), a decode-only step (its virtual
sequences from the device lengths alone), chunks of one, two and four blocks; the reference, the CPU kernels, the
batch-invariant ones and Triton's (in the interpreter on a CPU)."""
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


@pytest.mark.parametrize("block_size,chunk", [(16, 16), (8, 16)])
@pytest.mark.parametrize("lens", [MIXED, DECODE], ids=["mixed", "decode"])
def test_triton_on_chunked_metadata(kdev, block_size, chunk, lens):
    """Triton's prefill and decode kernels (split and not) on the virtual sequences: on a GPU in float32 and
    bfloat16, on the CPU in the interpreter (float32)."""
    from moelink.kernels.triton_attention import triton_paged_attention

    STEP_MEMO.clear()
    q, kc, vc, meta = _step(*lens, block_size, kdev, seed=5)
    want = _chunked_oracle(q.cpu(), kc.cpu(), vc.cpu(), _cpu(meta), chunk, 0.3)
    dtypes = (torch.float32, torch.bfloat16) if kdev.type == "cuda" else (torch.float32,)
    for dtype in dtypes:
        for splits in (None, 1, 3):
            got = triton_paged_attention(q.to(dtype), kc.to(dtype), vc.to(dtype),
                                         chunked_metadata(meta, chunk, block_size), 0.3, num_splits=splits)
            tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
            torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)


def _cpu(meta: AttentionMetadata) -> AttentionMetadata:
    import dataclasses

    return dataclasses.replace(meta, query_start_loc_S1=meta.query_start_loc_S1.cpu(),
                               seq_lens_S=meta.seq_lens_S.cpu(), block_tables_SM=meta.block_tables_SM.cpu(),
                               slot_mapping_T=meta.slot_mapping_T.cpu())


@pytest.mark.slow
def test_decode_graphs_of_a_chunked_model_match_eager(kdev, tmp_path):
    """Llama 4's chunked layers under decode graphs (the CPU stand-in of the capture, Triton in the interpreter): the
    graphs' padded static metadata goes through the virtual sequences on the device (padding rows of length 0), and
    the tokens equal the eager engine's while decode crosses chunks of 16 (prompts of 14, 15, 30 and 31 tokens)."""
    if kdev.type != "cpu":
        pytest.skip("CPU stand-in for the capture; with a GPU, test_gpu_engine.py captures real graphs")
    from moelink.engine import LLM, SamplingParams
    from moelink.engine.models.llama4.tiny import LLAMA4_MAVERICK
    from moelink.engine.tools.tiny_families import save_drawn_preset

    from tests.helpers.graph_replays import Replay, count_replays

    path = save_drawn_preset(tmp_path, LLAMA4_MAVERICK, num_hidden_layers=2, no_rope_layers=[1, 0])
    prompts = [[(7 * i + 3 * n) % 397 + 2 for i in range(n)] for n in (14, 15, 30, 31)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (6, 3, 5, 2)]

    def llm():
        return LLM(path, dtype="float32", device="cpu", kernels="triton", max_num_seqs=4, max_num_batched_tokens=64,
                   num_kv_blocks=32, block_size=16, enable_prefix_caching=False, skip_warmup=True)

    want = [o.outputs[0].token_ids for o in llm().generate(prompts, params, use_tqdm=False)]
    graphed = llm()
    runner = graphed.engine.executor.worker.runner
    runner.graph_sizes, runner.graph_backend = (1, 2, 4), Replay()
    runner._capture_graphs()
    assert runner.graphs is not None and set(runner.graphs.steps) == {1, 2, 4}
    replays = count_replays(runner.graphs)
    got = [o.outputs[0].token_ids for o in graphed.generate(prompts, params, use_tqdm=False)]
    assert sum(replays.values()) > 0, f"no step replayed a graph: {replays}"
    assert got == want
