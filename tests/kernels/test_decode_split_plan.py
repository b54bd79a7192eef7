"""The page-balanced decode split plan (kernels/triton_split_plan.py) and the paged-attention decode over it.

The plan against its definition, recomputed here in Python from the lengths; and the decode kernel over
plans of several sizes against the float64 reference at ragged shapes: one long context among short ones,
a 1-token sequence, window + sinks, an fp8 cache, and the padding rows a decode graph has (seq_len 1 over
the null block) under host lists that say max_model_len, as a graph's do. The plan and the output must
not depend on those host lists (a graph freezes them at capture).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moelink.kernels import split_planning
from moelink.kernels.attention import AttentionMetadata, reference_paged_attention
from moelink.kernels.triton_attention import triton_paged_attention, triton_write_kv
from moelink.kernels.triton_split_plan import plan_decode_splits

from tests.kernels.test_fp8_kv_cache import _fp8
from tests.kernels.test_triton_attention import _build, _meta_to


def _tiles(seq_len: int, q_len: int, block_n: int, window: int | None) -> int:
    if q_len != 1:
        return 0
    lo = 0 if window is None else max(seq_len - window, 0)
    return -(-seq_len // block_n) - lo // block_n


# (seq_lens, query lens, programs, BLOCK_N, window)
PLAN_CASES = [
    ([3000, 5, 17, 1, 64, 1], [1] * 6, 40, 16, None),  # one long context among short ones, a 1-token one
    ([3000, 5, 17, 1, 64, 1], [1] * 6, 6, 16, None),  # as many programs as sequences: one each
    ([40, 900, 33, 7], [1, 1, 12, 1], 30, 16, None),  # a prefill chunk in the batch weighs 0: one program
    ([1] * 5, [1] * 5, 60, 16, None),  # graph padding rows only: few tiles cap the programs used
    ([700, 650, 20], [1] * 3, 24, 32, 100),  # a window bounds each sequence's tiles
    ([1000 + 37 * i for i in range(40)] + [9], [1] * 41, 200, 64, None),  # more sequences than one 16-wide chunk
]


@pytest.mark.parametrize("seq_lens,q_lens,P,block_n,window", PLAN_CASES)
def test_plan_shares_programs_by_tiles(seq_lens, q_lens, P, block_n, window, kdev):
    S = len(seq_lens)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=kdev)
    ends = plan_decode_splits(torch.tensor(seq_lens, dtype=torch.int32, device=kdev), qsl, P, block_n, window).cpu()
    shares = torch.diff(ends.long(), prepend=torch.zeros(1, dtype=torch.long)).tolist()
    tiles = [_tiles(s, q, block_n, window) for s, q in zip(seq_lens, q_lens)]
    total = sum(tiles)
    used = min(P, max(S, total // 2))
    assert sum(shares) == used, (shares, used)
    assert min(shares) >= 1, shares
    for s, (share, t) in enumerate(zip(shares, tiles)):
        exact = 1 + (used - S) * t / max(total, 1)
        assert abs(share - exact) < 1, f"sequence {s}: share {share}, exact proportion {exact:.2f} ({shares})"
        if q_lens[s] != 1:
            assert share == 1
    if P > S and seq_lens[0] == 3000:
        assert shares[0] > used // 2, "the long context gets most of the programs"


def test_a_step_plans_its_splits_once(kdev, monkeypatch):
    """Every layer of a step reads the same lengths: the first layer's plan serves the others (one launch a step
    and a captured graph, not one a layer); another program count, tile width or window plans anew, and so do the
    next step's lengths (the runner clears the step's memos; outside inference mode an in-place write is seen too)."""
    from moelink.kernels import triton_split_plan as tsp
    from moelink.kernels.step_memo import STEP_MEMO

    launches = []
    real = tsp._plan_kernel
    monkeypatch.setattr(tsp, "_plan_kernel", type("Count", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or real[grid]})())
    STEP_MEMO.clear()
    with torch.inference_mode():
        seq = torch.tensor([300, 5, 17], dtype=torch.int32, device=kdev)
        qsl = torch.arange(4, dtype=torch.int32, device=kdev)
        first = plan_decode_splits(seq, qsl, 12, 16)
        assert plan_decode_splits(seq, qsl, 12, 16) is first and len(launches) == 1  # the next layer's
        for programs, block_n, window in ((12, 16, 100), (12, 32, None), (24, 16, None)):
            plan_decode_splits(seq, qsl, programs, block_n, window)
        assert len(launches) == 4
        seq.fill_(7)  # the next step's lengths, written in place into the same buffer
        STEP_MEMO.clear()  # as the model runner does when a step's device work starts
        assert not torch.equal(plan_decode_splits(seq, qsl, 12, 16), first) and len(launches) == 5
    seq = torch.tensor([300, 5, 17], dtype=torch.int32, device=kdev)
    before = plan_decode_splits(seq, qsl, 12, 16)
    seq.fill_(7)  # a versioned tensor's in-place write is a new key without a clear
    assert not torch.equal(plan_decode_splits(seq, qsl, 12, 16), before) and len(launches) == 7


def test_plan_refuses_fewer_programs_than_sequences(kdev):
    with pytest.raises(ValueError, match="programs"):
        plan_decode_splits(torch.ones(4, dtype=torch.int32, device=kdev),
                           torch.arange(5, dtype=torch.int32, device=kdev), 3, 16)


def test_program_count_reads_no_length():
    """P comes from the batch, the lanes and the SMs: the same for any context (the graph captures it once)."""
    cpu = torch.device("cpu")
    assert split_planning.decode_programs(cpu, 1, 1, 16) == 8  # 2 programs per (stand-in) SM
    assert split_planning.decode_programs(cpu, 4, 1, 16) == 4  # the batch fills the 4 stand-in SMs: no split
    assert split_planning.decode_programs(cpu, 1, 2, 16, window=40) == 1  # a window of < 2 tiles per split
    assert split_planning.decode_programs(cpu, 1, 2, 16, window=64) == 2


def _with_padding(meta: AttentionMetadata, pad: int, max_model_len: int | None):
    """The decode graph's view of `meta` plus `pad` padding rows (1 token, seq_len 1, the null block): the
    reference's metadata (true host lengths) and the kernel's (host lengths = max_model_len, as captured)."""
    S = meta.num_seqs
    dev = meta.seq_lens_S.device
    tables = torch.cat([meta.block_tables_SM, torch.full((pad, meta.block_tables_SM.shape[1]), meta.null_block,
                                                         dtype=torch.int32, device=dev)])
    seq_lens = meta.seq_lens + [1] * pad
    ref = AttentionMetadata(torch.arange(S + pad + 1, dtype=torch.int32, device=dev),
                            torch.tensor(seq_lens, dtype=torch.int32, device=dev), tables,
                            torch.cat([meta.slot_mapping_T, torch.full((pad,), -1, device=dev)]), [1] * (S + pad),
                            seq_lens, 1, max(seq_lens), meta.null_block)
    if max_model_len is None:
        return ref
    return dataclasses.replace(ref, seq_lens=[max_model_len] * (S + pad), max_seq_len=max_model_len)


# (ctx, N, K, H, block size, programs per sequence on average, window, sinks, fp8 cache)
DECODE_CASES = [
    ([300, 3, 1, 20, 9], 4, 1, 16, 16, 3, None, False, False),  # one long context, short ones, a 1-token one
    ([1000, 3, 1, 20, 9], 4, 1, 16, 16, 8, None, True, False),  # > 16 partials (a BLOCK_Z chunk) for the long one
    ([130, 2, 77], 6, 2, 24, 8, 4, 40, True, False),  # window + sinks, head dim 24 (padded)
    ([260, 1, 45], 4, 2, 16, 16, 5, None, True, True),  # fp8 cache with sinks
    ([90, 6, 200], 8, 2, 16, 4, 2, 33, False, True),  # fp8 cache, window, block size 4
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("ctx,N,K,H,bs,per_seq,window,sinks,fp8", DECODE_CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_planned_decode_matches_reference(ctx, N, K, H, bs, per_seq, window, sinks, fp8, dtype, gen, kdev, check,
                                          nan_buffer):
    k_scale, v_scale = (0.5, 0.25) if fp8 else (1.0, 1.0)
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, [(c, 1) for c in ctx], N, K, H, bs, torch.float32, "cpu")
    if fp8:
        kc, vc = _fp8(kc, k_scale), _fp8(vc, v_scale)
    else:
        kc, vc = kc.to(dtype), vc.to(dtype)
    kc, vc, meta = kc.to(kdev), vc.to(kdev), _meta_to(meta, kdev)
    triton_write_kv(k_new.to(kdev), v_new.to(kdev), kc, vc, slots.to(kdev), k_scale, v_scale)
    pad = 3  # rows a graph of 8 pads a step of 5 with
    q = torch.cat([q, torch.randn(pad, N, H, generator=gen)]).to(dtype).to(kdev)
    sinks_N = torch.randn(N, generator=gen).to(dtype).to(kdev) if sinks else None
    scale = 1 / math.sqrt(H)
    ref_meta = _with_padding(meta, pad, None)
    want = reference_paged_attention(q.double().cpu(), kc.cpu() if fp8 else kc.double().cpu(),
                                     vc.cpu() if fp8 else vc.double().cpu(), _meta_to(ref_meta, "cpu"), scale,
                                     sinks_N=None if sinks_N is None else sinks_N.double().cpu(),
                                     sliding_window=window, k_scale=k_scale, v_scale=v_scale)
    outs = []
    for max_model_len in (512, 4096):
        out = nan_buffer(q.shape, dtype, kdev)
        triton_paged_attention(q, kc, vc, _with_padding(meta, pad, max_model_len), scale, sinks_N=sinks_N,
                               sliding_window=window, k_scale=k_scale, v_scale=v_scale, out=out,
                               num_splits=per_seq)
        check(out, want, dtype, f"planned decode {ctx} window={window} sinks={sinks} fp8={fp8} "
              f"P={per_seq}xS max_model_len={max_model_len}")
        outs.append(out)
    assert torch.equal(outs[0], outs[1]), "the host lists' max_model_len changed the result"


def test_graph_plan_is_the_same_for_any_max_model_len(gen, kdev, monkeypatch):
    """Unforced, as a graph runs it: the decode grid and the device plan are identical, and the output is
    bit-identical, for two max_model_len values in the host lists (before, the split count came from them)."""
    from moelink.kernels import triton_attention as ta

    launches, plans = [], []
    real_kernel, real_plan = ta._decode_kernel, ta.plan.plan_decode_splits
    monkeypatch.setattr(ta, "_decode_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or real_kernel[grid]})())
    monkeypatch.setattr(ta.plan, "plan_decode_splits", lambda *a, **k: plans.append(real_plan(*a, **k).cpu()) or
                        plans[-1].to(kdev))
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, [(250, 1), (4, 1)], 4, 1, 16, 16, torch.float32, kdev)
    triton_write_kv(k_new, v_new, kc, vc, slots)
    q = torch.cat([q, torch.randn(1, 4, 16, generator=gen).to(kdev)])
    outs = [triton_paged_attention(q, kc, vc, _with_padding(meta, 1, mml), 0.25) for mml in (256, 32768)]
    assert launches[0] == launches[1] and launches[0][0] > 3, launches  # split: more programs than sequences
    assert torch.equal(plans[0], plans[1]) and plans[0][0] > 3, plans  # the long context has several programs
    assert torch.equal(outs[0], outs[1])


# -- MLA decode over the same plan --------------------------------------------------------------------------------------
# (ctx, N, C, P, block size, programs per sequence on average, fp8 latent cache)
MLA_DECODE_CASES = [
    ([600, 3, 1, 40], 4, 32, 16, 16, 8, False),  # one long context (> 1 partial per merge step), a 1-token one
    ([200, 1, 45], 20, 32, 16, 8, 4, True),  # 2 head blocks (20 heads), fp8 latent cache
]


@pytest.mark.parametrize("ctx,N,C,P,bs,per_seq,fp8", MLA_DECODE_CASES)
def test_planned_mla_decode_matches_reference(ctx, N, C, P, bs, per_seq, fp8, gen, kdev, check, nan_buffer):
    from moelink.kernels.mla import reference_mla_attention
    from moelink.kernels.triton_mla import triton_mla_attention, triton_write_latent

    from tests.kernels.test_mla import _build as build_latent, _to_fp8_cache

    kv_scale = 0.5 if fp8 else 1.0
    dtype = torch.bfloat16 if fp8 else torch.float32
    cache, meta, ckv_new, kpe_new, slots = build_latent(gen, [(c, 1) for c in ctx], C, P, bs, torch.float32, "cpu")
    cache = (_to_fp8_cache(cache, kv_scale) if fp8 else cache).to(kdev)
    meta = _meta_to(meta, kdev)
    triton_write_latent(ckv_new.to(kdev), kpe_new.to(kdev), cache, slots.to(kdev), kv_scale)
    pad = 2
    S = len(ctx) + pad
    q_lat = torch.randn(S, N, C, generator=gen).to(dtype).to(kdev)
    q_pe = torch.randn(S, N, P, generator=gen).to(dtype).to(kdev)
    scale = 1 / math.sqrt(C + P)
    want = reference_mla_attention(q_lat.double().cpu(), q_pe.double().cpu(), cache.cpu() if fp8 else cache.double().cpu(),
                                   _meta_to(_with_padding(meta, pad, None), "cpu"), scale, kv_scale)
    outs = []
    for max_model_len in (1024, 65536):
        out = nan_buffer((S, N, C), dtype, kdev)
        triton_mla_attention(q_lat, q_pe, cache, _with_padding(meta, pad, max_model_len), scale, kv_scale, out=out,
                             num_splits=per_seq)
        check(out, want, dtype, f"planned MLA decode {ctx} N={N} fp8={fp8} P={per_seq}xS max_model_len={max_model_len}")
        outs.append(out)
    assert torch.equal(outs[0], outs[1]), "the host lists' max_model_len changed the result"
