"""MLA (absorbed multi-head latent attention) over the paged latent cache: the reference against the plain
expanded computation, and the Triton kernels against the reference (float64 oracle).

Legend as in kernels/mla.py: T tokens, N heads, C latent width, P rope width, R = C + P, L block size,
Dn / Dv nope-key / value head widths. Caches are NaN everywhere but the null block and the rows written,
blocks are scattered at random and contexts are mostly not multiples of L, so a read of a slot the kernel
should not touch comes out NaN.
"""
from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from moelink.kernels.attention import AttentionMetadata
from moelink.kernels.mla import reference_mla_attention, reference_write_latent
from moelink.kernels.triton_mla import triton_mla_attention, triton_write_latent

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
dtype_id = lambda d: str(d).split(".")[-1]  # noqa: E731


def _build(gen, ctx_q, C, P, block_size, dtype, device):
    """A cache holding each sequence's earlier rows; returns (cache, meta, new ckv, new kpe, their slots)."""
    num_blocks = sum(-(-c // block_size) for c, _ in ctx_q) + 5
    cache = torch.full((num_blocks + 1, block_size, C + P), float("nan"), dtype=dtype)
    cache[num_blocks] = 0  # the null block stays zero, as the runner keeps it
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, new_ckv, new_kpe, slots = [], [], [], []
    for ctx, ql in ctx_q:
        blocks = [perm.pop() for _ in range(-(-ctx // block_size))]
        tables.append(blocks)
        ckv, kpe = torch.randn(ctx, C, generator=gen).to(dtype), torch.randn(ctx, P, generator=gen).to(dtype)
        seq_slots = [blocks[p // block_size] * block_size + p % block_size for p in range(ctx)]
        if ctx > ql:
            reference_write_latent(ckv[: ctx - ql], kpe[: ctx - ql], cache, torch.tensor(seq_slots[: ctx - ql]))
        new_ckv.append(ckv[ctx - ql :]), new_kpe.append(kpe[ctx - ql :])
        slots += seq_slots[ctx - ql :]
    q_lens, seq_lens = [q for _, q in ctx_q], [c for c, _ in ctx_q]
    M = max(len(t) for t in tables)
    meta = AttentionMetadata(
        torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        torch.tensor([t + [0] * (M - len(t)) for t in tables], dtype=torch.int32, device=device),
        torch.tensor(slots, dtype=torch.long, device=device), q_lens, seq_lens, max(q_lens), max(seq_lens),
        null_block=num_blocks)
    return cache.to(device), meta, torch.cat(new_ckv).to(device), torch.cat(new_kpe).to(device), meta.slot_mapping_T


def _meta_to(meta: AttentionMetadata, device) -> AttentionMetadata:
    return AttentionMetadata(meta.query_start_loc_S1.to(device), meta.seq_lens_S.to(device),
                             meta.block_tables_SM.to(device), meta.slot_mapping_T.to(device), meta.query_lens,
                             meta.seq_lens, meta.max_query_len, meta.max_seq_len, meta.null_block)


def _oracle(q_lat, q_pe, cache, meta, scale):
    return reference_mla_attention(q_lat.double().cpu(), q_pe.double().cpu(), cache.double().cpu(),
                                   _meta_to(meta, "cpu"), scale)


# -- the absorption algebra -------------------------------------------------------------------------------------------
def test_reference_equals_expanded_attention(gen):
    """Absorbed attention in latent space, then W_UV, equals ordinary causal attention with per-head K and V
    expanded from the latent by kv_b_proj (float64, decode + chunk over a prefix + fresh prompt)."""
    N, C, P, Dn, Dv, L = 3, 24, 8, 16, 12, 4
    ctx_q = [(11, 1), (19, 6), (7, 7), (1, 1)]
    cache, meta, ckv_new, kpe_new, slots = _build(gen, ctx_q, C, P, L, torch.float64, "cpu")
    reference_write_latent(ckv_new, kpe_new, cache, slots)
    w_kv_b = torch.randn(N * (Dn + Dv), C, generator=gen, dtype=torch.float64) / math.sqrt(C)  # kv_b_proj.weight
    w_uk_NDC, w_uv_NDC = w_kv_b.view(N, Dn + Dv, C).split([Dn, Dv], dim=1)
    T = sum(q for _, q in ctx_q)
    q_nope = torch.randn(T, N, Dn, generator=gen, dtype=torch.float64)
    q_pe = torch.randn(T, N, P, generator=gen, dtype=torch.float64)
    mscale = 1.3  # a yarn mscale: the caller folds its square into the scale
    scale = mscale * mscale / math.sqrt(Dn + P)

    q_latent = torch.einsum("tnd,ndc->tnc", q_nope, w_uk_NDC)
    out_latent = reference_mla_attention(q_latent, q_pe, cache, meta, scale)
    got = torch.einsum("tnc,ndc->tnd", out_latent, w_uv_NDC)

    want = torch.empty(T, N, Dv, dtype=torch.float64)
    start = 0
    for s, (ctx, ql) in enumerate(ctx_q):
        rows = torch.stack([cache[meta.block_tables_SM[s, p // L], p % L] for p in range(ctx)])  # [ctx, R]
        ckv, kpe = rows[:, :C], rows[:, C:]
        for n in range(N):
            k = torch.cat([ckv @ w_uk_NDC[n].T, kpe], dim=1)  # [ctx, Dn + P]
            v = ckv @ w_uv_NDC[n].T  # [ctx, Dv]
            q = torch.cat([q_nope[start : start + ql, n], q_pe[start : start + ql, n]], dim=1)  # [ql, Dn + P]
            scores = q @ k.T * scale
            visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - ql, ctx)[:, None]
            want[start : start + ql, n] = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v
        start += ql
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# -- Triton against the reference ---------------------------------------------------------------------------------------
# (ctx_q [(context length after this step, query length)], N, C, P, block size, splits)
MLA_CASES = [
    ([(1, 1), (5, 1), (17, 1), (40, 1)], 4, 48, 16, 4, None),  # decode only, contexts off the block size
    ([(150, 1), (3, 1)], 20, 40, 8, 16, 4),  # 2 head blocks (20 % 16), R = 48, a long decode split 4 ways
    ([(45, 13), (9, 9), (30, 1), (64, 3)], 3, 48, 16, 16, None),  # chunks over prefixes + a fresh prompt + decode
    ([(23, 2), (1, 1), (50, 7)], 5, 32, 32, 8, 3),  # mixed and split: the short rows' late splits are empty
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("ctx_q,N,C,P,bs,splits", MLA_CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_mla_matches_reference(ctx_q, N, C, P, bs, splits, dtype, gen, kdev, check, nan_buffer):
    cache, meta, ckv_new, kpe_new, slots = _build(gen, ctx_q, C, P, bs, dtype, kdev)
    triton_write_latent(ckv_new, kpe_new, cache, slots)
    T = sum(meta.query_lens)
    q_lat = torch.randn(T, N, C, generator=gen).to(dtype).to(kdev)
    q_pe = torch.randn(T, N, P, generator=gen).to(dtype).to(kdev)
    scale = 1 / math.sqrt(C + P)
    out = nan_buffer((T, N, C), dtype, kdev)
    got = triton_mla_attention(q_lat, q_pe, cache, meta, scale, out=out, num_splits=splits)
    assert got is out
    check(got, _oracle(q_lat, q_pe, cache, meta, scale), dtype, f"MLA {ctx_q} N={N} C={C} P={P} L={bs} Z={splits}")


# -- fp8 latent cache (--kv-cache-dtype fp8) ---------------------------------------------------------------------------
FP8 = torch.float8_e4m3fn


def _to_fp8_cache(cache, kv_scale):
    """A float cache as the fp8 write path would store it (NaN stays NaN: unwritten rows must stay poisoned)."""
    return (cache.float() / kv_scale).clamp(-448, 448).to(FP8)


def test_fp8_reference_reads_stored_times_scale(gen):
    """The reference over an fp8 cache equals the float64 reference over the dequantized cache (stored *
    kv_scale) exactly: the scale is the only thing fp8 adds to the read path."""
    ctx_q, N, C, P, L, kv_scale = [(11, 1), (19, 6), (3, 3)], 3, 24, 8, 4, 0.37
    cache, meta, ckv_new, kpe_new, slots = _build(gen, ctx_q, C, P, L, torch.float64, "cpu")
    reference_write_latent(ckv_new, kpe_new, cache, slots)
    cache8 = _to_fp8_cache(cache, kv_scale)
    T = sum(q for _, q in ctx_q)
    q_lat, q_pe = torch.randn(T, N, C, generator=gen, dtype=torch.float64), torch.randn(T, N, P, generator=gen, dtype=torch.float64)
    got = reference_mla_attention(q_lat, q_pe, cache8, meta, 0.2, kv_scale)
    want = reference_mla_attention(q_lat, q_pe, cache8.double() * kv_scale, meta, 0.2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ctx_q,N,C,P,bs,splits", [MLA_CASES[0], MLA_CASES[1], MLA_CASES[3]])
def test_mla_fp8_cache_matches_reference(ctx_q, N, C, P, bs, splits, gen, kdev, check, nan_buffer):
    """bf16 queries over an fp8 cache with a per-layer scale: the kernel (fp8 rows widened to bf16, the scale
    folded into the softmax scale and the output) against the float64 reference over the same fp8 rows."""
    kv_scale = 0.5
    cache, meta, ckv_new, kpe_new, slots = _build(gen, ctx_q, C, P, bs, torch.float32, "cpu")
    cache8 = _to_fp8_cache(cache, kv_scale).to(kdev)
    triton_write_latent(ckv_new.to(kdev), kpe_new.to(kdev), cache8, slots, kv_scale)
    T = sum(meta.query_lens)
    q_lat = torch.randn(T, N, C, generator=gen).to(torch.bfloat16).to(kdev)
    q_pe = torch.randn(T, N, P, generator=gen).to(torch.bfloat16).to(kdev)
    scale = 1 / math.sqrt(C + P)
    out = nan_buffer((T, N, C), torch.bfloat16, kdev)
    got = triton_mla_attention(q_lat, q_pe, cache8, meta, scale, kv_scale, out=out, num_splits=splits)
    want = reference_mla_attention(q_lat.double().cpu(), q_pe.double().cpu(), cache8.cpu(), _meta_to(meta, "cpu"),
                                   scale, kv_scale)
    check(got, want, torch.bfloat16, f"MLA fp8 cache {ctx_q} Z={splits}")


@pytest.mark.parametrize("T,C,P,bs", [(1, 16, 16, 16), (7, 48, 16, 4), (9, 40, 8, 1)])
def test_write_latent_fp8_matches_reference(T, C, P, bs, gen, kdev, seed):
    """fp8 writes: row / kv_scale saturated to ±448, bit for bit like the reference (some values saturate).
    float32 rows: bf16 ones divided by the scale land exactly halfway between two e4m3 values now and then,
    and the interpreter's cast breaks such ties away from zero where torch (and the GPU) round to even."""
    kv_scale = 0.01
    num_blocks = -(-T // bs) + 3
    ckv = torch.randn(T, C, generator=gen) * 3
    kpe = torch.randn(T, P, generator=gen) * 3
    # One value per row past ±448 * kv_scale on each side, whatever the seed: at T=1 the random rows alone
    # miss the saturation now and then (about one seed in a hundred).
    ckv[:, 0], kpe[:, -1] = 448 * kv_scale * 1.5, -448 * kv_scale * 1.5
    slots = torch.randperm(num_blocks * bs, generator=gen)[:T]
    want = torch.full((num_blocks + 1, bs, C + P), float("nan")).to(FP8)
    got = want.clone().to(kdev)
    reference_write_latent(ckv, kpe, want, slots, kv_scale)
    triton_write_latent(ckv.to(kdev), kpe.to(kdev), got, slots.to(kdev), kv_scale)
    assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8)), f"seed={seed}"
    assert (want.float().abs() == 448).any(), "the case should saturate some values"


def test_strided_queries_and_output(gen, kdev, check, nan_buffer):
    """q_latent as the transposed output of a per-head bmm ([N, T, C] memory), q_pe a slice of a wider
    projection, and out a transposed [N, T, C] buffer (what the W_UV bmm wants): strides are honoured."""
    N, C, P = 3, 32, 16
    cache, meta, ckv_new, kpe_new, slots = _build(gen, [(20, 4), (9, 1)], C, P, 8, torch.float32, kdev)
    triton_write_latent(ckv_new, kpe_new, cache, slots)
    T = 5
    q_lat = torch.randn(N, T, C, generator=gen).to(kdev).transpose(0, 1)
    q_pe = torch.randn(T, N, 64 + P, generator=gen).to(kdev)[:, :, 64:]
    out_NTC = nan_buffer((N, T, C), torch.float32, kdev)
    triton_mla_attention(q_lat, q_pe, cache, meta, 0.2, out=out_NTC.transpose(0, 1))
    check(out_NTC.transpose(0, 1), _oracle(q_lat, q_pe, cache, meta, 0.2), torch.float32, "strided q/out")


def test_long_context_small_batch_splits_by_itself(gen, kdev, check, monkeypatch):
    """Without forcing: one decode over a long context would leave SMs idle, so the wrapper splits the rows."""
    from moelink.kernels import triton_mla as tm

    grids, real = [], tm._mla_kernel
    monkeypatch.setattr(tm, "_mla_kernel", type("Spy", (), {"__getitem__": lambda self, g: grids.append(g) or real[g]})())
    cache, meta, ckv_new, kpe_new, slots = _build(gen, [(200, 1)], 16, 16, 16, torch.float32, kdev)
    triton_write_latent(ckv_new, kpe_new, cache, slots)
    q_lat, q_pe = torch.randn(1, 2, 16, generator=gen).to(kdev), torch.randn(1, 2, 16, generator=gen).to(kdev)
    got = triton_mla_attention(q_lat, q_pe, cache, meta, 0.25)
    assert grids and grids[0][0] > 1, f"a lone 200-row decode should have been split (work programs): grid {grids}"
    check(got, _oracle(q_lat, q_pe, cache, meta, 0.25), torch.float32, "auto split")


# -- latent write -----------------------------------------------------------------------------------------------------
# (T, C, P, block size, strided rows)
WRITE_CASES = [(1, 16, 16, 16, False), (7, 48, 16, 4, True), (9, 40, 8, 1, False), (5, 512, 64, 16, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("T,C,P,bs,strided", WRITE_CASES)
def test_write_latent_matches_reference(T, C, P, bs, strided, dtype, gen, kdev, seed):
    num_blocks = -(-T // bs) + 3
    if strided:  # ckv and kpe as slices of one kv_a_proj output row, as the model produces them
        kv_a = torch.randn(T, C + P + 8, generator=gen).to(dtype)
        ckv, kpe = kv_a[:, :C], kv_a[:, C + 8 :]
    else:
        ckv, kpe = torch.randn(T, C, generator=gen).to(dtype), torch.randn(T, P, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * bs, generator=gen)[:T]
    want = torch.full((num_blocks + 1, bs, C + P), float("nan"), dtype=dtype)
    got = want.clone().to(kdev)
    reference_write_latent(ckv, kpe, want, slots)
    triton_write_latent(ckv.to(kdev), kpe.to(kdev), got, slots.to(kdev))
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True, msg=f"seed={seed}")


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_write_latent_skips_negative_slots(gen, kdev, impl):
    """Slot -1 marks a padding token (decode graphs): its row lands nowhere and the null block stays zero."""
    write = triton_write_latent if impl == "triton" else reference_write_latent
    ckv, kpe = torch.randn(4, 24, generator=gen).to(kdev), torch.randn(4, 8, generator=gen).to(kdev)
    cache = torch.zeros(3, 4, 32, device=kdev)
    write(ckv, kpe, cache, torch.tensor([5, -1, 2, -1], device=kdev))
    flat = cache.view(-1, 32)
    assert torch.equal(flat[5], torch.cat([ckv[0], kpe[0]])) and torch.equal(flat[2], torch.cat([ckv[2], kpe[2]]))
    assert int((flat.abs().sum(1) != 0).sum()) == 2 and not cache[-1].any()


# -- errors and the selector ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_bad_inputs_name_the_argument(impl, kdev):
    attend = triton_mla_attention if impl == "triton" else reference_mla_attention
    write = triton_write_latent if impl == "triton" else reference_write_latent
    cache = torch.zeros(3, 4, 48, device=kdev)
    meta = AttentionMetadata(torch.tensor([0, 1], dtype=torch.int32, device=kdev),
                             torch.tensor([1], dtype=torch.int32, device=kdev),
                             torch.zeros(1, 1, dtype=torch.int32, device=kdev), torch.zeros(1, dtype=torch.long), [1],
                             [1], 1, 1, 2)
    q, pe = torch.zeros(1, 2, 40, device=kdev), torch.zeros(1, 2, 8, device=kdev)
    with pytest.raises(ValueError, match="latent_cache_BLR"):
        attend(q, torch.zeros(1, 2, 16, device=kdev), cache, meta, 1.0)  # 40 + 16 != 48
    with pytest.raises(ValueError, match="q_pe_TNP"):
        attend(q, torch.zeros(1, 3, 8, device=kdev), cache, meta, 1.0)
    with pytest.raises(ValueError, match="dtypes"):
        attend(q, pe.half(), cache, meta, 1.0)
    with pytest.raises(ValueError, match="latent_cache_BLR"):
        attend(q, pe, cache.transpose(0, 1), meta, 1.0)
    with pytest.raises(ValueError, match="latent_cache_BLR"):
        write(q[:, 0], torch.zeros(1, 4, device=kdev), cache, torch.zeros(1, dtype=torch.long, device=kdev))
    if impl == "triton":
        with pytest.raises(ValueError, match="out"):
            attend(q, pe, cache, meta, 1.0, out=torch.zeros(1, 2, 48, device=kdev))
        with pytest.raises(ValueError, match="num_splits"):
            attend(q, pe, cache, meta, 1.0, num_splits=0)


def test_selectors_offer_mla():
    from moelink.kernels.ops import ReferenceKernels, TritonKernels

    ref, tri = ReferenceKernels(), TritonKernels()
    assert ref.mla_attention is reference_mla_attention and ref.write_latent is reference_write_latent
    assert tri.mla_attention is triton_mla_attention and tri.write_latent is triton_write_latent


# -- compiled for sm_90 -----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test compiles and runs these for the real device")
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
@pytest.mark.xdist_group("mla_compile_report")  # the worker that ran the report (tests/kernels/conftest.py)
def test_mla_compiles_for_sm90_without_spills(mla_compile_report):
    """The DeepSeek-V3 bf16 cases of benchmarks/compile_cases.py (decode, planned split decode + plan + merge,
    mixed batch unsplit and split + merge, latent write; the same over an fp8 latent cache, the mixed batches'
    widen kernel included) compile for sm_90 with no spills, <= 255 registers, shared memory under the limit and
    tensor-core MMAs in the attention kernel (tests/kernels/test_triton_compile.py does the rest). The report's
    run (`--only mla --quick`, Triton's own cache) is the session's `mla_compile_report` (tests/kernels/conftest.py)."""
    proc, out = mla_compile_report
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = json.loads(out.with_suffix(".json").read_text())["kernels"]
    assert {k["name"] for k in kernels} == {"_mla_kernel", "_mla_merge_kernel", "_mla_merge_plan_kernel", "_plan_kernel",
                                            "_write_latent_kernel", "_widen_kernel"}
    for k in kernels:
        what = f"{k['name']} {k['constexprs']}"
        assert k["spill_stores"] == k["spill_loads"] == k["local"] == 0, f"spills: {what}"
        assert 0 < k["registers"] <= 255 and k["shared"] <= 227 * 1024, what
        if k["name"] == "_mla_kernel":
            assert k["tensor_cores"] in ("wgmma", "mma.sync"), f"no tensor-core instruction: {what}"


# -- DeepSeek-V3 shapes on a GPU ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["decode64", "decode2", "mixed"])
def test_mla_deepseek_v3_shapes_on_gpu(case, gen, check):
    """128 heads, latent 512, rope 64, bf16, 16-token blocks: 64 decodes over 4096+ rows (no split), 2 decodes
    over 8k rows (split-K by itself), and decodes beside a 300-token chunk over a 3k prefix."""
    N, C, P = 128, 512, 64
    lens = torch.randint(4096, 4700, (64,), generator=gen).tolist()
    ctx_q = {"decode64": [(n, 1) for n in lens], "decode2": [(8000, 1), (8191, 1)],
             "mixed": [(n, 1) for n in lens[:15]] + [(3300, 300)]}[case]
    cache, meta, ckv_new, kpe_new, slots = _build(gen, ctx_q, C, P, 16, torch.bfloat16, "cuda")
    triton_write_latent(ckv_new, kpe_new, cache, slots)
    T = sum(meta.query_lens)
    q_lat = torch.randn(T, N, C, generator=gen).to("cuda", torch.bfloat16)
    q_pe = torch.randn(T, N, P, generator=gen).to("cuda", torch.bfloat16)
    scale = 1 / math.sqrt(128 + P)  # DeepSeek-V3's softmax_scale without yarn's mscale
    got = triton_mla_attention(q_lat, q_pe, cache, meta, scale)
    want = reference_mla_attention(q_lat.double(), q_pe.double(), cache.double(), meta, scale)
    check(got, want, torch.bfloat16, f"DeepSeek-V3 MLA {case}")
