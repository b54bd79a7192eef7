"""The batch-invariant backend's Triton kernels (kernels/batch_invariant_triton.py, issue 58 item 4), in the
interpreter here (compiled on a GPU): each equals its plain-torch reference, and a row's result is bitwise the same
alone and among 2-40 other rows (attention: also as a decode row and as a row of a prefill chunk). Each invariance
check is paired with what the normal Triton path does (a launch config or a split count that follows the batch),
which gives other bits (so the check can fail)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moelink.kernels.attention import reference_paged_attention
from moelink.kernels.moe import reference_fused_moe
from tests.kernels.test_batch_invariant import _cache, _meta, _seq


def _row_everywhere(make, run, sizes):
    """run(batch)[0] for the target row alone (size 0) and with `sizes` other rows after it (and, for the largest,
    before it too): the list of the target row's results."""
    out = []
    target = make(1)
    for n in (0, *sizes):
        batch = torch.cat([target, make(n)]) if n else target
        out.append(run(batch)[0])
    n = max(sizes)
    out.append(run(torch.cat([make(n), target]))[n])
    return out


@pytest.mark.slow  # over 1 s (interpreter, 2026-11-26: ~1.5 s)
def test_matmul_matches_linear_and_a_row_is_the_same_in_any_batch(kdev):
    from moelink.kernels.triton_invariant_matmul import INTERPRETER_CONFIG, triton_invariant_linear

    gen = torch.Generator().manual_seed(0)
    K, N = 80, 40  # K not a multiple of the K tile (a masked tail), N not of the N tile
    w = torch.randn(N, K, generator=gen).to(kdev)
    bias = torch.randn(N, generator=gen).to(kdev)
    make = lambda n: torch.randn(n, K, generator=gen).to(kdev)  # noqa: E731
    x = make(23)
    torch.testing.assert_close(triton_invariant_linear(x, w, bias), F.linear(x.double(), w.double(), bias.double()).float(),
                               atol=1e-5, rtol=1e-5)
    rows = _row_everywhere(make, lambda b: triton_invariant_linear(b, w), (2, 17, 40))
    assert all(torch.equal(r, rows[0]) for r in rows)
    # Another K tile sums in another order: a config that followed M would move the row's bits.
    other = triton_invariant_linear(x[:1], w, config=INTERPRETER_CONFIG._replace(BLOCK_K=16))
    assert not torch.equal(other[0], triton_invariant_linear(x[:1], w)[0])


def test_the_triton_mode_sends_products_by_a_weight_to_the_invariant_matmul(kdev):
    from moelink.kernels.batch_invariant_triton import TritonBatchInvariantMode
    from moelink.kernels.triton_invariant_matmul import triton_invariant_linear

    gen = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*s, generator=gen).to(kdev) for s in ((2, 5, 48), (24, 48), (24,)))
    want = triton_invariant_linear(x.reshape(10, 48), w, b).reshape(2, 5, 24)
    with TritonBatchInvariantMode():
        got_linear = F.linear(x, w, b)
        got_matmul = x @ w.t()
        got_double = F.linear(x.double(), w.double())  # float64 keeps the mode's tiled torch path
    assert torch.equal(got_linear, want)
    assert torch.equal(got_matmul, triton_invariant_linear(x.reshape(10, 48), w).reshape(2, 5, 24))
    torch.testing.assert_close(got_double, F.linear(x.double(), w.double()))


def test_rms_norm_is_row_local(kdev):
    from moelink.kernels.norm import reference_rms_norm
    from moelink.kernels.triton_norm import triton_rms_norm

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, generator=gen).to(kdev, torch.bfloat16)
    make = lambda n: torch.randn(n, 48, generator=gen).to(kdev, torch.bfloat16)  # noqa: E731
    rows = _row_everywhere(make, lambda b: triton_rms_norm(b, w, 1e-6), (2, 40))
    assert all(torch.equal(r, rows[0]) for r in rows)
    x = make(5)
    torch.testing.assert_close(triton_rms_norm(x, w, 1e-6), reference_rms_norm(x, w, 1e-6), atol=2e-2, rtol=2e-2)


@pytest.mark.slow  # over 1 s (interpreter, 2026-11-26: ~4 s)
def test_fused_moe_on_the_fixed_config_matches_the_reference_and_a_token_is_the_same_in_any_batch(kdev):
    from moelink.kernels.batch_invariant_triton import invariant_triton_fused_moe
    from moelink.kernels.moe_config import lookup_moe_config
    from moelink.kernels.triton_moe import triton_fused_moe

    gen = torch.Generator().manual_seed(3)
    E, D, I, K = 8, 256, 32, 2  # D over several K tiles of both the fixed config and the tuned ones
    w13 = (torch.randn(E, 2 * I, D, generator=gen) * 0.1).to(kdev)
    w2 = (torch.randn(E, D, I, generator=gen) * 0.1).to(kdev)

    def make(n):
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(n)]) if n else torch.empty(0, K)
        return torch.cat([torch.randn(n, D, generator=gen), torch.rand(n, K, generator=gen), ids.float()], 1).to(kdev)

    def run(fn, **kw):
        return lambda b: fn(b[:, :D].contiguous(), w13, w2, b[:, D:D + K].contiguous(), b[:, D + K:].long(), **kw)

    b = make(13)
    want = reference_fused_moe(b[:, :D].double(), w13.double(), w2.double(), b[:, D:D + K].double(), b[:, D + K:].long())
    torch.testing.assert_close(run(invariant_triton_fused_moe)(b), want.float(), atol=1e-5, rtol=1e-5)
    rows = _row_everywhere(make, run(invariant_triton_fused_moe), (2, 17, 40))
    assert all(torch.equal(r, rows[0]) for r in rows)
    # The normal selection: an H100's tuned table gives a 1-token batch and a 16-token one other K tiles, and with
    # them the same token's output moves (so the fixed config is what the check above relies on).
    h100 = "NVIDIA_H100_80GB_HBM3"
    small, mid = (lookup_moe_config(128, 768, t, 8, h100) for t in (1, 16))
    assert small.up.BLOCK_SIZE_K != mid.up.BLOCK_SIZE_K
    one, batch = make(1), make(15)
    alone = run(triton_fused_moe, config=small, path="sorted")(one)[0]
    among = run(triton_fused_moe, config=mid, path="sorted")(torch.cat([one, batch]))[0]
    assert not torch.equal(alone, among)


def test_a_tuned_invariant_config_is_one_config_for_every_count(tmp_path, monkeypatch, kdev):
    """`python -m moelink.benchmarks.tune_moe_invariant`'s file: its one config is what the mode runs for that shape on that GPU, at any
    batch (a token keeps its bits on it: another fixed config than the built-in one, in the interpreter); a file of
    more than one bucket, or with a TINY entry, is refused by name, since it would make the config the batch's."""
    from moelink.kernels import batch_invariant_triton as bit
    from moelink.kernels.moe_config import DEFAULT_TINY_FLOAT, GemmConfig, MoELaunchConfig, write_config_file
    from moelink.kernels.triton_moe import triton_fused_moe

    gpu = "NVIDIA_H100_80GB_HBM3"
    other = MoELaunchConfig(32, GemmConfig(16, 64, 1, 4, 1), GemmConfig(32, 16, 1, 4, 1))
    write_config_file(tmp_path / bit.invariant_file_name(8, 32, gpu), {32: other})
    assert bit.tuned_invariant_config(8, 32, gpu, str(tmp_path)) == other
    assert bit.tuned_invariant_config(8, 48, gpu, str(tmp_path)) is None  # another shape: the built-in config
    write_config_file(tmp_path / bit.invariant_file_name(8, 64, gpu), {1: other, 256: other})
    with pytest.raises(ValueError, match=r"batch_invariant,E=8,N=64,.*must hold one config.*holds 2 bucket"):
        bit.tuned_invariant_config(8, 64, gpu, str(tmp_path))
    write_config_file(tmp_path / bit.invariant_file_name(8, 16, gpu), {32: MoELaunchConfig(
        32, other.up, other.down, tiny=DEFAULT_TINY_FLOAT)})
    with pytest.raises(ValueError, match="and a TINY entry"):
        bit.tuned_invariant_config(8, 16, gpu, str(tmp_path))
    assert bit.invariant_moe_config(torch.zeros(2, 4, device=kdev), 8, 32) == bit.builtin_moe_config(False, torch.float32)

    gen = torch.Generator().manual_seed(5)
    E, D, I, K = 8, 96, 32, 2
    w13 = (torch.randn(E, 2 * I, D, generator=gen) * 0.1).to(kdev)
    w2 = (torch.randn(E, D, I, generator=gen) * 0.1).to(kdev)

    def make(n):
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(n)]) if n else torch.empty(0, K)
        return torch.cat([torch.randn(n, D, generator=gen), torch.rand(n, K, generator=gen), ids.float()], 1).to(kdev)

    def run(b):
        return triton_fused_moe(b[:, :D].contiguous(), w13, w2, b[:, D:D + K].contiguous(), b[:, D + K:].long(),
                                config=other, combine="sum", path="sorted")

    rows = _row_everywhere(make, run, (3, 40))
    assert all(torch.equal(r, rows[0]) for r in rows)


@pytest.mark.slow  # over 1 s (interpreter, 2026-11-26: ~6-9 s each)
@pytest.mark.parametrize("dtype,extras", [(torch.float32, {}),
                                          (torch.bfloat16, dict(window=7, sinks=True))])
def test_attention_matches_the_reference_and_a_row_is_the_same_as_decode_or_prefill_in_any_batch(dtype, extras, kdev):
    from moelink.kernels.triton_attention import triton_paged_attention
    from moelink.kernels.triton_invariant_attention import triton_invariant_paged_attention

    gen = torch.Generator().manual_seed(4)
    N, K, H, bs, L = 4, 2, 16, 4, 40
    sinks_N = torch.randn(N, generator=gen).to(kdev) if extras.get("sinks") else None
    window = extras.get("window")
    target = _seq(gen, L, K, H, dtype)
    q_LNH = torch.randn(L, N, H, generator=gen).to(dtype)
    others = [_seq(gen, c, K, H, dtype) for c in (3, 57, 21)]
    k_cache, v_cache, tables, nb = _cache(gen, [target] + others, K, H, bs, dtype)
    k_cache, v_cache, q_LNH = k_cache.to(kdev), v_cache.to(kdev), q_LNH.to(kdev)

    def attend(fn, layout, bound=None, **kw):
        meta = _meta([tables[s] for s, _, _ in layout], [c for _, c, _ in layout], [q for _, _, q in layout], nb)
        if bound is not None:  # a decode graph's host max_seq_len (engine/rank/graph_policy.py): more splits held
            meta = dataclasses.replace(meta, max_seq_len=bound)
        meta = dataclasses.replace(meta, **{f: getattr(meta, f).to(kdev) for f in (
            "query_start_loc_S1", "seq_lens_S", "block_tables_SM", "slot_mapping_T")})
        rows, q = [], []
        for s, ctx, ql in layout:
            if s == 0:
                rows.append((len(q), ctx - ql, ql))
                q += list(q_LNH[ctx - ql:ctx])
            else:
                q += list(torch.randn(ql, N, H, generator=gen).to(kdev, dtype))
        q_TNH = torch.stack(q)
        out = fn(q_TNH, k_cache, v_cache, meta, H ** -0.5, sinks_N=sinks_N, sliding_window=window, **kw)
        return q_TNH, meta, out, {p0 + i: out[r + i] for r, p0, ql in rows for i in range(ql)}

    # 16 keys a split in the interpreter (its key tile): the target's rows cross two split boundaries. (Compiled,
    # a split is at least one 64-key tile: one split at these lengths.)
    keys = 16 if kdev.type == "cpu" else 64
    inv = lambda *a, **kw: triton_invariant_paged_attention(*a, split_keys=keys, **kw)  # noqa: E731
    q_TNH, meta, got, _ = attend(inv, [(1, 3, 3), (0, L, L), (2, 57, 9)])
    want = reference_paged_attention(q_TNH, k_cache, v_cache, meta, H ** -0.5, sinks_N=sinks_N, sliding_window=window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    many = [(1 + i % 3, (3, 57, 21)[i % 3], 1) for i in range(40)]  # 40 decode rows of the other sequences
    layouts = [
        [(0, L, L)], [(1, 3, 3), (0, L, L), (2, 57, 9)],      # prefill, alone and among others
        [(2, 40, 1), (0, L, 23)],                             # a later chunk (a prefix hit on the first 17)
        [(0, L, 1)], [(1, 3, 1), (0, L, 1), (3, 21, 1)], many[:20] + [(0, L, 1)] + many[20:],  # decode of the last row
        [(0, 33, 1)], [(2, 57, 1), (0, 33, 1)],               # a middle row as decode
    ]
    if dtype != torch.float32:  # the window and the sinks: the layouts that cross its rows' splits, cheaper
        layouts = [layouts[0], layouts[2], layouts[3], layouts[4]]
    # As a decode graph runs it: the partials sized for a bound past every context (max_model_len), and one or two
    # programs per (token, kv head) walking the row's splits in turn instead of one program per split.
    variants = [([(1, 3, 1), (0, L, 1), (3, 21, 1)], dict(bound=100, programs=2)), ([(0, L, L)], dict(programs=1))]
    seen: dict[int, list] = {}
    for layout, kw in [(lay, {}) for lay in layouts] + variants:
        for p, row in attend(inv, layout, **kw)[3].items():
            seen.setdefault(p, []).append(row)
    assert all(torch.equal(r, rows[0]) for rows in seen.values() for r in rows)
    if dtype != torch.float32:
        return
    assert len(seen[L - 1]) == 8 and len(seen[32]) == 6
    # The normal prefill kernel splits the keys by a count the step sets (splits.prefill_splits: the SMs the batch
    # leaves idle): the same row of the same chunk under split counts 1 and 3 differs.
    normal = [attend(triton_paged_attention, [(0, L, L)], prefill_splits=z)[3][L - 1] for z in (1, 3)]
    assert not torch.equal(normal[0], normal[1])


def test_the_mode_picks_the_triton_backend_on_a_gpu_and_plain_torch_on_a_cpu(monkeypatch):
    from moelink.kernels import ops

    assert ops.backend_class(torch.device("cpu"), "batch_invariant") is ops.BatchInvariantKernels
    monkeypatch.setattr(ops, "_triton_available", lambda: True)
    assert ops.backend_class(torch.device("cuda"), "batch_invariant") is ops.BatchInvariantTritonKernels
    assert ops.backend_class(torch.device("cuda"), "auto") is ops.TritonKernels
    kernels = ops.BatchInvariantTritonKernels()
    from moelink.kernels.batch_invariant_triton import TritonBatchInvariantMode, invariant_triton_fused_moe

    from moelink.kernels.triton_router_topk import triton_route_topk

    assert kernels.route_topk is triton_route_topk
    assert kernels.fused_moe is invariant_triton_fused_moe and isinstance(kernels.step_context(),
                                                                           TritonBatchInvariantMode)


@pytest.mark.slow  # over 1 s (interpreter, 2026-11-26: ~1.5 s)
def test_the_row_local_kernels_the_backend_keeps_give_a_row_the_same_bits_in_any_batch(kdev):
    """The normal backend's per-token kernels that BatchInvariantTritonKernels keeps as they are (the fused
    q/k norm + rotary + KV write, router top-k, SiLU-mul): row 0's outputs alone and among 2 and 40 other rows,
    bitwise; each also the reference's within rounding (kernels/rotary.py, router_topk.py, silu_mul.py)."""
    from moelink.kernels.rotary import reference_rope_write_kv, rotary_cos_sin_cache
    from moelink.kernels.router_topk import reference_route_topk
    from moelink.kernels.silu_mul import reference_silu_mul
    from moelink.kernels.triton_rope_kv import triton_rope_write_kv
    from moelink.kernels.triton_router_topk import triton_route_topk
    from moelink.kernels.triton_silu_mul import triton_silu_mul

    gen = torch.Generator().manual_seed(5)
    N, K, H, G, I, bs = 4, 2, 16, 16, 24, 4
    table = rotary_cos_sin_cache(H, 256, 1e4).to(kdev)
    wq, wk = (1 + 0.1 * torch.randn(H, generator=gen)).to(kdev), (1 + 0.1 * torch.randn(H, generator=gen)).to(kdev)
    row0 = [torch.randn(1, w, generator=gen) for w in ((N + 2 * K) * H, G, 2 * I)]

    def run(n, fn_rope, fn_route, fn_silu):
        qkv, logits, gu = (torch.cat([r, torch.randn(n, r.shape[1], generator=gen)]).to(kdev) for r in row0)
        q = qkv[:, :N * H].view(-1, N, H)
        k, v = qkv[:, N * H:(N + K) * H].view(-1, K, H), qkv[:, (N + K) * H:].view(-1, K, H)
        pos = torch.cat([torch.tensor([77]), torch.randint(0, 256, (n,), generator=gen)]).to(kdev)
        caches = [torch.zeros(n + 2, bs, K, H, device=kdev) for _ in range(2)]
        slots = (torch.randperm(n + 1, generator=gen) * bs).to(kdev)
        q_out = fn_rope(q, k, v, pos, table, *caches, slots, wq, wk, 1e-6)
        weights, ids = fn_route(logits, 3, renormalize=True)
        s0 = int(slots[0])
        return (q_out[0], caches[0].view(-1, K, H)[s0], caches[1].view(-1, K, H)[s0], weights[0], ids[0],
                fn_silu(gu[:, :I], gu[:, I:])[0])

    triton = (triton_rope_write_kv, triton_route_topk, triton_silu_mul)
    alone, *batched = (run(n, *triton) for n in (0, 2, 40))
    assert all(torch.equal(a, b) for other in batched for a, b in zip(alone, other))
    for got, want in zip(alone, run(0, reference_rope_write_kv, reference_route_topk, reference_silu_mul)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled kernels run the GPU's MMA: no host BLAS to ask")
def test_the_interpreters_dot_never_asks_the_host_blas(monkeypatch):
    """Issue 82: the interpreter's tile products are numpy's element-wise products and reduction, not numpy's matmul
    (OpenBLAS picks its kernel by the CPU, and its AVX2 Haswell kernel rounds a row by its place in the tile), so the
    invariance the tests above see is the kernel's own on any CPU. `make test CPU_ISA=avx2` runs them as such a CPU."""
    import numpy as np

    from moelink.kernels.triton_invariant_matmul import triton_invariant_linear

    def no_blas(*args, **kwargs):
        raise AssertionError("the interpreter's dot called numpy.matmul (the host BLAS)")

    gen = torch.Generator().manual_seed(6)
    x, w = torch.randn(5, 40, generator=gen), torch.randn(24, 40, generator=gen)
    monkeypatch.setattr(np, "matmul", no_blas)
    got = triton_invariant_linear(x, w)
    monkeypatch.undo()
    torch.testing.assert_close(got, F.linear(x.double(), w.double()).float(), atol=1e-5, rtol=1e-5)
