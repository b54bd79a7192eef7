"""The native CPU kernels (kernels/cpu_native.py, kernels/csrc/cpu_ops.c) against their plain-torch references at
small ragged shapes: float32 to float32 rounding (the sums inside a row run in another order), bfloat16 to one
rounding step, and every input they do not take (float64, strided rows, other router methods, many pairs) handed to
the reference unchanged (the build and its cache: test_cpu_native_build.py)."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from moelink.kernels import cpu_native as cn
from moelink.kernels import cpu_native_build as build
from moelink.kernels.attention import AttentionMetadata, reference_paged_attention
from moelink.kernels.moe import MoEActivation, reference_fused_moe
from moelink.kernels.norm import reference_add_rms_norm, reference_rms_norm
from moelink.kernels.rotary import reference_rope_write_kv, rotary_cos_sin_cache
from moelink.kernels.router_topk import reference_route_topk

pytestmark = pytest.mark.skipif(build.library() is None, reason="no C compiler here: the references run")


@pytest.fixture
def native_only(monkeypatch):
    """The native ops' fallbacks raise: a parity check that passes ran the native code, not the reference it is
    compared with (the references are imported here under their own names, untouched)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the native op fell back to its reference")
    for name in ("reference_rms_norm", "reference_add_rms_norm", "reference_route_topk", "reference_fused_moe",
                 "reference_paged_attention", "reference_rope_write_kv", "reference_silu_mul"):
        monkeypatch.setattr(cn, name, refuse)


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, steps: int = 1) -> None:
    """float32: a few ulps of the row's scale; bfloat16: `steps` rounding steps (2^-7 of the row's scale each)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.float().abs().max().clamp(min=1.0).item()
    tol = 2e-6 * scale if dtype == torch.float32 else steps * 2 ** -7 * scale
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(1, 128), (3, 37), (17, 8)])
def test_norms_match_the_references(dtype, rows, width, native_only):
    g = torch.Generator().manual_seed(rows * width)
    x, res = (torch.randn(rows, width, generator=g).to(dtype) * 3 for _ in range(2))
    w = torch.randn(width, generator=g).to(dtype)
    close(cn.native_rms_norm(x, w, 1e-6), reference_rms_norm(x, w, 1e-6), dtype)
    (out, summed), (want, want_sum) = cn.native_add_rms_norm(x, res, w, 1e-5), reference_add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(summed, want_sum)  # one add per value, rounded once: the same bits
    close(out, want, dtype)
    # A row's result is its own: the same alone as in the batch.
    assert torch.equal(cn.native_rms_norm(x[-1:], w, 1e-6)[0], cn.native_rms_norm(x, w, 1e-6)[-1])


def test_norm_inputs_it_does_not_take_run_the_reference():
    x64, w64 = torch.randn(4, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    assert torch.equal(cn.native_rms_norm(x64, w64, 1e-6), reference_rms_norm(x64, w64, 1e-6))
    strided = torch.randn(16, 4).t()  # [4, 16], not dense
    w = torch.randn(16)
    assert torch.equal(cn.native_rms_norm(strided, w, 1e-6), reference_rms_norm(strided, w, 1e-6))
    big, w64 = torch.randn(cn.NATIVE_MAX_ELEMENTS // 64 + 1, 64), torch.randn(64)  # a prefill's size: torch's threads
    assert torch.equal(cn.native_rms_norm(big, w64, 1e-6), reference_rms_norm(big, w64, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_greedy_router_matches_the_reference(dtype, native_only):
    g = torch.Generator().manual_seed(3)
    for T, G, K in [(1, 8, 2), (5, 11, 3), (9, 64, 8)]:
        # Distinct values in every row (bfloat16 too): ties go to the reference (the tie test below).
        logits = torch.stack([torch.randperm(G, generator=g) for _ in range(T)]).to(dtype) * 0.0625
        valid = torch.rand(T, generator=g) > 0.3
        for renorm, scale, use_valid in itertools.product((False, True), (1.0, 2.5), (False, True)):
            c_got, c_want = torch.zeros(G, dtype=torch.long), torch.zeros(G, dtype=torch.long)
            v = valid if use_valid else None
            w_got, i_got = cn.native_route_topk(logits, K, renormalize=renorm, scale=scale, valid_T=v, counts_G=c_got)
            w_want, i_want = reference_route_topk(logits, K, renormalize=renorm, scale=scale, valid_T=v,
                                                  counts_G=c_want)
            assert torch.equal(i_got, i_want) and torch.equal(c_got, c_want)
            close(w_got, w_want, torch.float32)


def test_other_router_methods_run_the_reference():
    logits = torch.randn(3, 16)
    bias = torch.randn(16)
    got = cn.native_route_topk(logits, 4, "noaux_tc", True, 1.0, 4, 2, bias)
    want = reference_route_topk(logits, 4, "noaux_tc", True, 1.0, 4, 2, bias)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="bias_G is only taken"):
        cn.native_route_topk(logits, 4, "greedy", bias_G=bias)


ACTIVATIONS = [MoEActivation(), MoEActivation("swiglu_oai", 1.702, 1.0), MoEActivation("silu_clamp", limit=0.8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: a.kind)
def test_few_token_experts_match_the_reference(dtype, activation, native_only):
    g = torch.Generator().manual_seed(7)
    E, D, I = 6, 40, 24
    w13 = (torch.randn(E, 2 * I, D, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(E, D, I, generator=g) * 0.2).to(dtype)
    for T, K, biased in [(1, 2, False), (3, 2, True), (5, 3, False), (8, 2, True)]:
        x = torch.randn(T, D, generator=g).to(dtype)
        ids = torch.randint(-1, E, (T, K), generator=g)  # -1: no expert (adds nothing)
        weights = torch.rand(T, K, generator=g)
        b13 = torch.randn(E, 2 * I, generator=g).to(dtype) if biased else None
        b2 = torch.randn(E, D, generator=g).to(dtype) if biased else None
        got = cn.native_fused_moe(x, w13, w2, weights, ids, b13_EF=b13, b2_ED=b2, activation=activation)
        close(got, reference_fused_moe(x, w13, w2, weights, ids, b13_EF=b13, b2_ED=b2, activation=activation), dtype)
        # Under EP's expert map: global ids, -1 for another rank's experts.
        expert_map = torch.tensor([-1, 0, -1, 1, 2, -1, 3, 4, 5, -1], dtype=torch.int32)
        gids = torch.randint(-1, 10, (T, K), generator=g)
        close(cn.native_fused_moe(x, w13, w2, weights, gids, expert_map),
              reference_fused_moe(x, w13, w2, weights, gids, expert_map), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_over_threads_are_the_one_thread_call_bit_for_bit(monkeypatch, dtype, native_only):
    g = torch.Generator().manual_seed(5)
    E, D, I, T = 4, 20, 12, 7  # widths off the 8-lane and 4-row blocks
    w13, w2 = torch.randn(E, 2 * I, D, generator=g).to(dtype), torch.randn(E, D, I, generator=g).to(dtype)
    x, ids = torch.randn(T, D, generator=g).to(dtype), torch.randint(-1, E, (T, 2), generator=g)
    weights = torch.rand(T, 2, generator=g)
    one = cn.native_fused_moe(x, w13, w2, weights, ids)
    monkeypatch.setattr(cn, "threads_for", lambda work: 3)
    assert torch.equal(cn.native_fused_moe(x, w13, w2, weights, ids), one)


def test_many_pairs_and_float64_experts_run_the_reference():
    E, D, I = 4, 16, 8
    # T x 2 pairs > the bound (per intra-op thread)
    for dtype, T in [(torch.float32, cn.NATIVE_MOE_MAX_PAIRS * torch.get_num_threads()), (torch.float64, 2)]:
        w13, w2 = torch.randn(E, 2 * I, D, dtype=dtype), torch.randn(E, D, I, dtype=dtype)
        x, ids, weights = torch.randn(T, D, dtype=dtype), torch.randint(0, E, (T, 2)), torch.rand(T, 2)
        assert torch.equal(cn.native_fused_moe(x, w13, w2, weights, ids), reference_fused_moe(x, w13, w2, weights, ids))


def attention_case(dtype, query_lens, ctxs, num_heads=4, kv_heads=2, head_dim=16, v_dim=16, block=4, seed=0):
    """Caches full of NaN but where the sequences' keys sit (blocks in shuffled order) and in the null block (zeros,
    where the tables' padding points), q, and the metadata."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    blocks = 64
    kc = torch.full((blocks, block, kv_heads, head_dim), float("nan"), dtype=dtype)
    vc = torch.full((blocks, block, kv_heads, v_dim), float("nan"), dtype=dtype)
    free = list(range(blocks - 1))
    rng.shuffle(free)
    width = max(-(-c // block) for c in ctxs) + 1
    kc[blocks - 1], vc[blocks - 1] = 0, 0
    tables = torch.full((len(ctxs), width), blocks - 1, dtype=torch.int32)
    for s, ctx in enumerate(ctxs):
        for b in range(-(-ctx // block)):
            tables[s, b] = blk = free.pop()
            n = min(block, ctx - b * block)
            kc[blk, :n] = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
            vc[blk, :n] = torch.randn(n, kv_heads, v_dim, generator=g).to(dtype)
    T = sum(query_lens)
    q = torch.randn(T, num_heads, head_dim, generator=g).to(dtype)
    qsl = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32)
    meta = AttentionMetadata(qsl, torch.tensor(ctxs, dtype=torch.int32), tables, torch.zeros(T, dtype=torch.long),
                             list(query_lens), list(ctxs), max(query_lens), max(ctxs), blocks - 1)
    return q, kc, vc, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 3, 7])
@pytest.mark.parametrize("sinks", [False, True])
def test_paged_attention_matches_the_reference(dtype, window, sinks, native_only):
    for query_lens, ctxs, heads in [([1, 1, 1], [5, 9, 1], (4, 2, 16, 16)), ([1, 3, 1, 4], [6, 3, 13, 10], (4, 2, 16, 16)),
                                    ([2], [2], (8, 1, 16, 8)),
                                    # three query heads a kv head (rows two at a time, then one), values 32 wide
                                    ([1, 1], [9, 17], (6, 2, 16, 32))]:
        N, K, H, Hv = heads
        q, kc, vc, meta = attention_case(dtype, query_lens, ctxs, N, K, H, Hv)
        sinks_N = torch.randn(N, generator=torch.Generator().manual_seed(N)) if sinks else None
        got = cn.native_paged_attention(q, kc, vc, meta, 0.3, sinks_N=sinks_N, sliding_window=window)
        assert not got.isnan().any()  # only the sequences' own keys are read
        # bfloat16: the reference's SDPA rounds the probabilities before the value sum, native rounds once: two steps.
        close(got, reference_paged_attention(q, kc, vc, meta, 0.3, sinks_N=sinks_N, sliding_window=window), dtype,
              steps=2)


def test_attention_rows_are_their_own_and_long_steps_run_the_reference():
    q, kc, vc, meta = attention_case(torch.float32, [1, 1, 1], [7, 12, 3])
    alone = cn.native_paged_attention(q[1:2], kc, vc, meta.select(1, 2), 0.5)
    assert torch.equal(alone[0], cn.native_paged_attention(q, kc, vc, meta, 0.5)[1])
    q, kc, vc, meta = attention_case(torch.float32, [cn.NATIVE_ATTENTION_MAX_QUERY + 1], [20])
    got = cn.native_paged_attention(q, kc, vc, meta, 0.5)
    assert torch.equal(got, reference_paged_attention(q, kc, vc, meta, 0.5))
    with pytest.raises(ValueError, match="sinks_N"):
        cn.native_paged_attention(q, kc, vc, meta, 0.5, sinks_N=torch.zeros(3))


@pytest.mark.parametrize("threads", [2, 3])
def test_attention_over_threads_is_the_one_thread_call_bit_for_bit(monkeypatch, threads, native_only):
    # Ragged: decode rows and chunks, so threads take sequences of unequal work.
    q, kc, vc, meta = attention_case(torch.float32, [1, 3, 1, 4, 1, 2], [6, 3, 13, 10, 1, 7])
    whole = cn.native_paged_attention(q, kc, vc, meta, 0.3)
    monkeypatch.setattr(cn, "threads_for", lambda work: threads)
    assert torch.equal(cn.native_paged_attention(q, kc, vc, meta, 0.3), whole)
    meta.block_tables_SM[5, 0] = kc.shape[0]  # a block past the cache, in the last sequence: the one error
    with pytest.raises(IndexError, match="out of range"):
        cn.native_paged_attention(q, kc, vc, meta, 0.3)


def test_the_library_runs_teams_of_torchs_threads_where_the_compiler_has_openmp():
    """Built with -fopenmp where the compiler takes it (cc here: gcc), a team of n threads has n."""
    lib = build.library()
    assert lib.ml_team_size(1) == 1
    assert lib.ml_team_size(3) == (3 if "-fopenmp" in build.built_flags() else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_ops_split_over_threads_are_the_one_call_bit_for_bit(monkeypatch, dtype, native_only):
    """add_rms_norm and rope_write_kv at any size (a prefill's too), their rows split over threads: the same bits,
    and an out-of-range slot in any range writes nothing."""
    g = torch.Generator().manual_seed(3)
    T, N, K, H, D = 7, 4, 2, 16, 24
    x, r, w = (torch.randn(*shape, generator=g).to(dtype) for shape in ((T, D), (T, D), (D,)))
    qkv = torch.randn(T, (N + 2 * K) * H, generator=g).to(dtype)
    q, k, v = qkv[:, :N * H].view(T, N, H), qkv[:, N * H:(N + K) * H].view(T, K, H), qkv[:, (N + K) * H:].view(T, K, H)
    positions, slots = torch.tensor([3, 0, 7, 2, 9, 1, 4]), torch.tensor([5, -1, 0, 17, 2, 30, 11])
    table = rotary_cos_sin_cache(16, 16, 10000.0)

    def run():
        caches = [torch.zeros(8, 4, K, H, dtype=dtype) for _ in range(2)]
        return (*cn.native_add_rms_norm(x, r, w, 1e-6), cn.native_rope_write_kv(q, k, v, positions, table, *caches,
                                                                                 slots), *caches)

    whole = run()
    monkeypatch.setattr(cn, "threads_for", lambda work: 3)
    assert all(torch.equal(a, b) for a, b in zip(run(), whole))
    caches = [torch.zeros(8, 4, K, H, dtype=dtype) for _ in range(2)]
    with pytest.raises(IndexError, match="slot outside the cache"):
        cn.native_rope_write_kv(q, k, v, positions, table, *caches, torch.tensor([5, -1, 0, 17, 2, 30, 32]))
    assert not caches[0].any() and not caches[1].any()  # the first ranges' valid slots were not written either


def test_a_mixed_step_runs_its_decode_rows_natively_and_its_prompt_chunks_on_the_reference(monkeypatch):
    """A decode batch with new prompts' chunks in it (a busy server's usual step): each run of short rows is the
    native kernel's, each long chunk the reference's, bit for bit as in a step of its own."""
    long = cn.NATIVE_ATTENTION_MAX_QUERY + 2
    query_lens, ctxs = [1, 1, long, 1, 3, long + 1], [5, 9, long, 7, 12, long + 4]
    q, kc, vc, meta = attention_case(torch.float32, query_lens, ctxs)
    calls = []  # the reference's calls: one per long chunk's run, none for the short runs
    monkeypatch.setattr(cn, "reference_paged_attention", lambda q, *a, **k: calls.append(len(q)) or
                        reference_paged_attention(q, *a, **k))
    got = cn.native_paged_attention(q, kc, vc, meta, 0.3, sliding_window=7)
    assert calls == [long, long + 1]
    t = [0, *itertools.accumulate(query_lens)]
    for s0, s1, path in [(0, 2, cn.native_paged_attention), (2, 3, reference_paged_attention),
                         (3, 5, cn.native_paged_attention), (5, 6, reference_paged_attention)]:
        alone = path(q[t[s0]:t[s1]], kc, vc, meta.select(s0, s1), 0.3, sliding_window=7)
        assert torch.equal(got[t[s0]:t[s1]], alone), (s0, s1)
    assert cn._query_runs(query_lens) == [(0, 2), (2, 3), (3, 5), (5, 6)]
    close(got, reference_paged_attention(q, kc, vc, meta, 0.3, sliding_window=7), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("rotary_dims", [16, 8])
def test_rope_write_kv_is_the_reference_bit_for_bit(dtype, normed, rotary_dims, native_only):
    g = torch.Generator().manual_seed(rotary_dims)
    T, N, K, H = 5, 4, 2, 16
    qkv = torch.randn(T, (N + 2 * K) * H, generator=g).to(dtype)  # q, k, v: strided views of one projection
    q, k, v = qkv[:, :N * H].view(T, N, H), qkv[:, N * H:(N + K) * H].view(T, K, H), qkv[:, (N + K) * H:].view(T, K, H)
    positions = torch.tensor([3, 0, 7, 2, 9])
    table = rotary_cos_sin_cache(rotary_dims, 16, 10000.0)
    slots = torch.tensor([5, -1, 0, 17, 2])  # -1: a padding token, written nowhere
    qn, kn = (torch.randn(H, generator=g).to(dtype) if normed else None for _ in range(2))
    caches = [[torch.zeros(8, 4, K, H, dtype=dtype) for _ in range(2)] for _ in range(2)]
    got = cn.native_rope_write_kv(q, k, v, positions, table, *caches[0], slots, qn, kn, 1e-6)
    want = reference_rope_write_kv(q, k, v, positions, table, *caches[1], slots, qn, kn, 1e-6)
    assert torch.equal(got, want) and got.is_contiguous()
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_an_engine_on_the_native_kernels_decodes_as_on_the_references():
    """The built-in model served in float32 by each CPU backend: the same greedy tokens, batched and alone (the
    native kernels' rows are their own), chunked prefill included."""
    from pathlib import Path

    from moelink.engine import LLM, SamplingParams

    model = Path(__file__).resolve().parents[2] / "builtin-model"
    prompts = [{"prompt_token_ids": list(range(5 + 7 * i, 30 + 9 * i))} for i in range(3)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = {}
    for kernels in ("cpu_native", "reference"):
        llm = LLM(str(model), dtype="float32", kernels=kernels, max_num_seqs=4, max_num_batched_tokens=16,
                  num_kv_blocks=32)
        try:
            assert llm.engine.executor.worker.runner.kernels.name == kernels
            batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        finally:
            llm.engine.shutdown()
        assert [list(t) for t in batched] == [list(t) for t in alone]
        outs[kernels] = [list(t) for t in batched]
    assert outs["cpu_native"] == outs["reference"]


def test_out_of_range_inputs_raise_before_anything_is_written():
    """A position past the rotary table, a slot past the cache, a block past the cache: an IndexError (as the
    references' index ops raise), never a read or write outside the tensors."""
    T, N, K, H = 2, 2, 1, 8
    q, k, v = torch.randn(T, N, H), torch.randn(T, K, H), torch.randn(T, K, H)
    table = rotary_cos_sin_cache(H, 4, 10000.0)
    kc, vc = torch.zeros(2, 2, K, H), torch.zeros(2, 2, K, H)
    for positions, slots in [([0, 4], [0, 1]), ([0, 1], [0, 4])]:
        with pytest.raises(IndexError, match="rope_write_kv"):
            cn.native_rope_write_kv(q, k, v, torch.tensor(positions), table, kc, vc, torch.tensor(slots))
        assert not kc.any() and not vc.any()
    q, kc, vc, meta = attention_case(torch.float32, [1, 1], [5, 3])
    meta.block_tables_SM[1, 0] = kc.shape[0]
    with pytest.raises(IndexError, match="paged_attention"):
        cn.native_paged_attention(q, kc, vc, meta, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_ids_and_silu_mul_match_torch(dtype):
    g = torch.Generator().manual_seed(11)
    for width in (1, 5, 17, 4096, 4099):
        x = torch.randn(9, width, generator=g).to(dtype)
        x[1, width // 2] = x[1].max() + 1
        x[1, width - 1] = x[1, width // 2]  # equal maxima: the first
        x[2, width - 1] = float("nan")  # a NaN is the largest (the first NaN)
        x[3, 0] = float("nan")
        x[4] = float("-inf")
        x[5] = 3.0
        assert torch.equal(cn.greedy_ids(x), x.argmax(dim=-1))
    assert torch.equal(cn.greedy_ids(x.double()), x.double().argmax(dim=-1))  # float64: torch's
    h = torch.randn(6, 48, generator=g).to(dtype)
    gate, up = h.chunk(2, dim=-1)  # strided halves, as a gate_up projection's output
    from moelink.kernels.silu_mul import reference_silu_mul
    close(cn.native_silu_mul(gate, up), reference_silu_mul(gate, up), dtype)


def test_router_ties_take_torch_topk_order_and_count_once():
    """Equal logits (frequent in bfloat16): torch.topk's order, as the reference and transformers pick them; the
    expert-load count added once (the native pass counts nothing when it hands a call over)."""
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.tensor([[0.5, 2.0, 2.0, 1.0, 2.0, -1.0], [3.0, 1.0, 0.0, 1.0, 2.0, 2.5],
                               [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]).to(dtype)
        c_got, c_want = torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)
        got = cn.native_route_topk(logits, 2, renormalize=True, counts_G=c_got)
        want = reference_route_topk(logits, 2, renormalize=True, counts_G=c_want)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]) and torch.equal(c_got, c_want)
        assert int(c_got.sum()) == 6


def test_a_nan_gate_stays_nan_through_every_activation():
    E, D, I = 2, 8, 4
    w13, w2 = torch.randn(E, 2 * I, D), torch.randn(E, D, I)
    w13[0, 0] = float("nan")  # expert 0's first gate row
    x, ids, weights = torch.randn(1, D), torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.4]])
    for activation in ACTIVATIONS:
        got = cn.native_fused_moe(x, w13, w2, weights, ids, activation=activation)
        want = reference_fused_moe(x, w13, w2, weights, ids, activation=activation)
        assert got.isnan().all() and want.isnan().all(), activation.kind


def same_outcome(native, reference) -> None:
    """Both raise the same error type, or both return equal results (and leave equal tensors behind)."""
    outcomes = []
    for fn in (native, reference):
        try:
            outcomes.append(("ok", fn()))
        except Exception as exc:  # noqa: BLE001
            outcomes.append(("raised", type(exc)))
    (kind_a, a), (kind_b, b) = outcomes
    assert kind_a == kind_b, outcomes
    if kind_a == "raised":
        assert a is b
    else:
        flat = lambda r: [t for t in (r if isinstance(r, (tuple, list)) else (r,))]  # noqa: E731
        assert all(torch.equal(x, y) for x, y in zip(flat(a), flat(b)))


def test_shapes_that_do_not_fit_get_the_references_answer():
    """Mismatched heads, widths, caches, norms, metadata or routing shapes: what the reference does (its error, or
    its answer), never a read or write outside a tensor."""
    T, N, K, H = 2, 4, 2, 8
    q, k, v = torch.randn(T, N, H), torch.randn(T, K, H), torch.randn(T, K, H)
    table, slots, positions = rotary_cos_sin_cache(H, 8, 10000.0), torch.tensor([0, 1]), torch.tensor([0, 1])

    def rope(fn, cache_shape, **kw):
        caches = [torch.zeros(cache_shape), torch.zeros(cache_shape)]
        return lambda: (fn(q, k, v, kw.get("positions", positions), table, *caches, kw.get("slots", slots),
                           kw.get("qn"), kw.get("kn")), *caches)
    for shape, kw in [((4, 2, 1, H), {}),  # one KV head where k and v have two
                      ((4, 2, 2, H), dict(qn=torch.ones(4), kn=torch.ones(4))),  # norms of another width
                      ((4, 2, 2, H), dict(slots=slots[:1])), ((4, 2, 2, H), dict(positions=positions[:1]))]:
        same_outcome(rope(cn.native_rope_write_kv, shape, **kw), rope(reference_rope_write_kv, shape, **kw))
    q6, kc, vc, meta = attention_case(torch.float32, [1, 1], [5, 3], num_heads=6, kv_heads=4)  # 6 heads over 4
    same_outcome(lambda: cn.native_paged_attention(q6, kc, vc, meta, 0.5),
                 lambda: reference_paged_attention(q6, kc, vc, meta, 0.5))
    q, kc, vc, meta = attention_case(torch.float32, [1, 1], [5, 3], head_dim=16)
    same_outcome(lambda: cn.native_paged_attention(q[..., :8].contiguous(), kc, vc, meta, 0.5),  # q narrower
                 lambda: reference_paged_attention(q[..., :8].contiguous(), kc, vc, meta, 0.5))
    E, D, I = 3, 8, 4
    w13, w2, x = torch.randn(E, 2 * I, D), torch.randn(E, D, I), torch.randn(2, D)
    ids, w1 = torch.tensor([[0, 1], [2, 0]]), torch.rand(2, 1)
    same_outcome(lambda: cn.native_fused_moe(x, w13, w2, w1, ids), lambda: reference_fused_moe(x, w13, w2, w1, ids))
    with pytest.raises(IndexError):  # an expert past the layer's three
        cn.native_fused_moe(x, w13, w2, torch.rand(2, 2), torch.tensor([[0, 3], [1, 2]]))
    logits, valid = torch.randn(3, 6), torch.tensor([True])  # a [1] mask broadcasts in the reference
    same_outcome(lambda: cn.native_route_topk(logits, 2, valid_T=valid),
                 lambda: reference_route_topk(logits, 2, valid_T=valid))
