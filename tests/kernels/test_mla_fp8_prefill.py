"""Chunked prefill over an fp8 latent cache (issue 27): the chunks' context is widened once per chunk
(kernels/triton_mla_wide.py) and read as a bf16 cache; decode tokens keep reading the fp8 cache. Against the
plain-torch reference over the same fp8 cache (float64), at small ragged shapes, in the Triton interpreter;
and the work per chunk counted there (tests/helpers/interpreter_counts.py).

Legend as in kernels/mla.py: N heads, C latent width, P rope width, R = C + P, L block size.
"""
from __future__ import annotations

import math

import pytest
import torch

from moelink.kernels import triton_mla_wide as wide
from moelink.kernels.mla import reference_mla_attention
from moelink.kernels.triton_mla import triton_mla_attention, triton_write_latent

from tests.helpers.interpreter_counts import interpreter_counts, total
from tests.kernels.test_mla import _build, _meta_to, _to_fp8_cache

N, C, P, L = 5, 40, 8, 8  # 5 heads: one padded head block; R = 48; blocks of 8 rows
KV_SCALE = 0.5


def _step(gen, ctx_q, kdev, dtype=torch.bfloat16):
    """One batch over an fp8 cache (NaN where nothing was written, blocks scattered): this step's rows written
    by the Triton fp8 write, then (cache, meta, q_latent, q_pe)."""
    cache, meta, ckv_new, kpe_new, slots = _build(gen, ctx_q, C, P, L, torch.float32, "cpu")
    cache8 = _to_fp8_cache(cache, KV_SCALE).to(kdev)
    triton_write_latent(ckv_new.to(kdev), kpe_new.to(kdev), cache8, slots.to(kdev), KV_SCALE)
    T = sum(meta.query_lens)
    q_lat = torch.randn(T, N, C, generator=gen).to(dtype).to(kdev)
    q_pe = torch.randn(T, N, P, generator=gen).to(dtype).to(kdev)
    return cache8, _meta_to(meta, kdev), q_lat, q_pe


def _want(cache8, meta, q_lat, q_pe, scale):
    return reference_mla_attention(q_lat.double().cpu(), q_pe.double().cpu(), cache8.cpu(), _meta_to(meta, "cpu"),
                                   scale, KV_SCALE)


# The steps of a 61-token prompt chunked 24 / 24 / 13 beside decodes, then a batch where a second prompt starts
# (its first chunk: no cached prefix) while the first one decodes: contexts off the block size throughout.
CHUNKED_STEPS = [[(24, 24), (9, 1), (30, 1)],
                 [(48, 24), (10, 1), (31, 1)],
                 [(61, 13), (11, 1), (32, 1)],
                 [(62, 1), (17, 17), (33, 1), (5, 5)]]


@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("max_rows", [wide.WIDE_ROWS_MAX, 48])  # 48 rows: several passes, 61 rows read directly
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_chunked_prefill_over_fp8_cache_matches_reference(splits, max_rows, gen, kdev, check, nan_buffer,
                                                          monkeypatch):
    monkeypatch.setattr(wide, "WIDE_ROWS_MAX", max_rows)
    scale = 1 / math.sqrt(C + P)
    for ctx_q in CHUNKED_STEPS:
        cache8, meta, q_lat, q_pe = _step(gen, ctx_q, kdev)
        out = nan_buffer(tuple(q_lat.shape), torch.bfloat16, kdev)
        got = triton_mla_attention(q_lat, q_pe, cache8, meta, scale, KV_SCALE, out=out, num_splits=splits)
        check(got, _want(cache8, meta, q_lat, q_pe, scale), torch.bfloat16,
              f"fp8 chunked prefill {ctx_q} Z={splits} max_rows={max_rows}")


def test_plan_wide_groups_chunks_into_passes():
    """Decodes read the fp8 cache; chunks go into passes of at most max_rows rows (whole blocks), in batch
    order; a context longer than a pass reads the fp8 cache too."""
    plan = wide.plan_wide([1, 24, 1, 13, 17, 40], [9, 48, 30, 61, 17, 200], 8, max_rows=80)
    # blocks: 48 -> 6, 61 -> 8, 17 -> 3; 200 -> 25 > 10 blocks: direct
    assert plan.direct == (0, 2, 5)
    assert plan.passes == (((1, 0),), ((3, 0),), ((4, 0),))
    plan = wide.plan_wide([24, 13, 17], [48, 61, 17], 8, max_rows=wide.WIDE_ROWS_MAX)
    assert plan.direct == () and plan.passes == (((0, 0), (1, 6), (2, 14)),)


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_a_chunk_widens_its_context_once(gen, kdev):
    """The work per chunk, counted in the interpreter: each cached row of a chunk's context is widened from e4m3
    once, by the widen kernel, however many tokens the chunk has (it was once per token, in the attention
    kernel); the attention kernel widens only the decode tokens' rows; it reads about the bytes it reads over
    a bf16 cache. Launches: the widen kernel, one attention launch over the workspace, one over the fp8 cache
    for the decodes."""
    if kdev.type != "cpu":
        pytest.skip("counts come from the CPU interpreter")
    scale = 1 / math.sqrt(C + P)
    widened = {}
    for q in (8, 32):  # the same 64-row context, chunks of 8 and 32 tokens, beside two decodes
        cache8, meta, q_lat, q_pe = _step(gen, [(64, q), (9, 1), (30, 1)], kdev)
        with interpreter_counts() as counts:
            triton_mla_attention(q_lat, q_pe, cache8, meta, scale, KV_SCALE, num_splits=1)
        widened[q] = total(counts, "fp8_widened", "_widen_kernel")
        assert counts["launches", "_widen_kernel"] == 1 and counts["launches", "_mla_kernel"] == 2
        # The chunk's 64 rows, once (in tiles of L rows x 64 columns: R = 48 rounds up to 64).
        assert widened[q] == 64 * 64
        assert total(counts, "load_bytes", "_widen_kernel", "fp8e4nv") == 64 * (C + P)
        # In the attention kernel, only the decodes' rows are widened: 9 + 30 rows in 16-row tiles (16 + 32), each
        # as a 64-wide latent tile and a 16-wide rope tile (C = 40 and P = 8 rounded up to powers of two).
        assert total(counts, "fp8_widened", "_mla_kernel") == (16 + 32) * (64 + 16)
        bf16_cache = cache8.to(torch.bfloat16)  # the same values in a bf16 cache: what the bf16 kernel reads
        with interpreter_counts() as ref:
            triton_mla_attention(q_lat, q_pe, bf16_cache, meta, scale, KV_SCALE, num_splits=1)
        # Wide rows read by the chunk's tokens + fp8 rows by the decodes <= the bf16 kernel's reads.
        read = total(counts, "load_bytes", "_mla_kernel", "bf16") + total(counts, "load_bytes", "_mla_kernel", "fp8e4nv")
        assert read <= total(ref, "load_bytes", "_mla_kernel", "bf16")
    assert widened[8] == widened[32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_mixed_batch_deepseek_v3_shapes_on_gpu(gen, check):
    """128 heads, latent 512, rope 64, bf16 queries over an fp8 cache (kv_scale 0.5), 16-token blocks: 15 decodes
    over 4k+ rows beside a 300-token chunk over a 3k prefix and a fresh 200-token prompt, compiled."""
    N_, C_, P_ = 128, 512, 64
    lens = torch.randint(4096, 4700, (15,), generator=gen).tolist()
    ctx_q = [(n, 1) for n in lens] + [(3300, 300), (200, 200)]
    cache, meta, ckv_new, kpe_new, slots = _build(gen, ctx_q, C_, P_, 16, torch.float32, "cuda")
    cache8 = _to_fp8_cache(cache, KV_SCALE)
    triton_write_latent(ckv_new.to(torch.bfloat16), kpe_new.to(torch.bfloat16), cache8, slots, KV_SCALE)
    T = sum(meta.query_lens)
    q_lat = torch.randn(T, N_, C_, generator=gen).to("cuda", torch.bfloat16)
    q_pe = torch.randn(T, N_, P_, generator=gen).to("cuda", torch.bfloat16)
    scale = 1 / math.sqrt(128 + P_)
    got = triton_mla_attention(q_lat, q_pe, cache8, meta, scale, KV_SCALE)
    check(got, _want(cache8, meta, q_lat, q_pe, scale), torch.bfloat16, "DeepSeek-V3 MLA, fp8 cache, mixed batch")
