"""The plain-torch kernels' per-step memos (kernels/step_memo.py) and the CPU decode path they feed: a decode group
gathered by whole blocks reads nothing past a sequence's end (stale or NaN cache contents), every layer of a step
reuses the first one's plan, and a cleared memo rebuilds it."""
from __future__ import annotations

import math

import pytest
import torch

from moelink.kernels.attention import AttentionMetadata, reference_paged_attention
from moelink.kernels.rotary import reference_rope_write_kv, rotary_cos_sin_cache
from moelink.kernels.step_memo import STEP_MEMO, StepMemo

L, K, N, H = 4, 2, 4, 8


def _dense(q_NH, k_CKH, v_CKH, scale, window=None):
    rep = N // K
    k_CNH, v_CNH = k_CKH.repeat_interleave(rep, 1), v_CKH.repeat_interleave(rep, 1)
    s_NC = torch.einsum("nh,cnh->nc", q_NH, k_CNH) * scale
    C = k_CKH.shape[0]
    if window is not None:
        s_NC[:, : max(0, C - window)] = float("-inf")
    return torch.einsum("nc,cnh->nh", torch.softmax(s_NC, -1), v_CNH)


def _decode_step(lens, num_blocks=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = len(lens)
    M = max(-(-n // L) for n in lens) + 1  # one padded column past the longest
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(S, M, dtype=torch.int32)
    for s, n in enumerate(lens):
        for b in range(-(-n // L)):
            tables[s, b] = perm.pop()
    # Every cache entry NaN but the sequences' own positions: nothing else may be read.
    k_cache = torch.full((num_blocks + 1, L, K, H), float("nan"), dtype=torch.float64)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_cache[-1] = 0.0
    v_cache[-1] = 0.0
    ctx = []
    for s, n in enumerate(lens):
        k_CKH = torch.randn(n, K, H, generator=g, dtype=torch.float64)
        v_CKH = torch.randn(n, K, H, generator=g, dtype=torch.float64)
        for p in range(n):
            k_cache[tables[s, p // L], p % L] = k_CKH[p]
            v_cache[tables[s, p // L], p % L] = v_CKH[p]
        ctx.append((k_CKH, v_CKH))
    meta = AttentionMetadata(
        query_start_loc_S1=torch.arange(S + 1, dtype=torch.int32), seq_lens_S=torch.tensor(lens, dtype=torch.int32),
        block_tables_SM=tables, slot_mapping_T=torch.zeros(S, dtype=torch.long), query_lens=[1] * S,
        seq_lens=list(lens), max_query_len=1, max_seq_len=max(lens), null_block=num_blocks)
    q_SNH = torch.randn(S, N, H, generator=g, dtype=torch.float64)
    return q_SNH, k_cache, v_cache, meta, ctx


@pytest.mark.parametrize("lens", [[5], [1, 7, 12, 3], [9] * 3 + list(range(1, 40))])  # one group; several groups
@pytest.mark.parametrize("window", [None, 6])
def test_cpu_decode_reads_no_stale_or_nan_position(lens, window):
    q_SNH, k_cache, v_cache, meta, ctx = _decode_step(lens)
    STEP_MEMO.clear()
    scale = 1 / math.sqrt(H)
    extras = {} if window is None else {"sliding_window": window}
    out_SNH = reference_paged_attention(q_SNH, k_cache, v_cache, meta, scale, **extras)
    assert torch.isfinite(out_SNH).all()
    for s, (k_CKH, v_CKH) in enumerate(ctx):
        torch.testing.assert_close(out_SNH[s], _dense(q_SNH[s], k_CKH, v_CKH, scale, window))


def test_every_layer_of_a_step_reuses_the_first_ones_plan(monkeypatch):
    q_SNH, k_cache, v_cache, meta, _ = _decode_step([3, 9, 14])
    import moelink.kernels.decode_plan as decode_plan

    built = []
    real = decode_plan._plans
    monkeypatch.setattr(decode_plan, "_plans", lambda *a: built.append(1) or real(*a))
    STEP_MEMO.clear()
    first = reference_paged_attention(q_SNH, k_cache, v_cache, meta, 0.3)
    for _ in range(3):  # the step's other layers
        torch.testing.assert_close(reference_paged_attention(q_SNH, k_cache, v_cache, meta, 0.3), first)
    assert len(built) == 1
    STEP_MEMO.clear()  # the next step (the runner clears it as each step's device work starts)
    reference_paged_attention(q_SNH, k_cache, v_cache, meta, 0.3)
    assert len(built) == 2


def test_a_tensor_written_in_place_is_a_new_key():
    memo = StepMemo()
    x = torch.zeros(3)
    assert memo.get("t", (x,), None, lambda: x.sum().item()) == 0.0
    x += 1  # a normal tensor's version moves
    assert memo.get("t", (x,), None, lambda: x.sum().item()) == 3.0
    with torch.inference_mode():
        y = torch.zeros(2)
    assert memo.get("t", (y,), None, lambda: 1) == 1
    assert memo.get("t", (y,), None, lambda: 2) == 1  # inference tensors: no version, the clear covers them
    memo.clear()
    assert memo.get("t", (y,), None, lambda: 2) == 2


def test_memo_keeps_only_its_last_entries():
    memo = StepMemo(max_entries=2)
    xs = [torch.zeros(1) for _ in range(3)]
    for i, x in enumerate(xs):
        memo.get("t", (x,), None, lambda i=i: i)
    assert memo.get("t", (xs[0],), None, lambda: "again") == "again"  # the oldest went
    assert memo.get("t", (xs[2],), None, lambda: "again") == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rope_write_kv_one_norm_and_rotation_for_q_and_k_is_the_same_bits(dtype):
    """q and k normed and rotated as one tensor (per-head weights after the norm) give exactly the values of
    the ops one by one."""
    from moelink.kernels.norm import reference_rms_norm
    from moelink.kernels.rotary import reference_rotary

    g = torch.Generator().manual_seed(1)
    T = 5
    q, k, v = (torch.randn(T, n, H, generator=g, dtype=dtype) for n in (N, K, K))
    qw, kw = torch.randn(H, generator=g, dtype=dtype), torch.randn(H, generator=g, dtype=dtype)
    pos = torch.tensor([0, 3, 7, 2, 11])
    table = rotary_cos_sin_cache(H, 16, 10000.0)
    kc, vc = torch.zeros(8, L, K, H, dtype=dtype), torch.zeros(8, L, K, H, dtype=dtype)
    slots = torch.tensor([0, 5, 9, 13, 30])
    STEP_MEMO.clear()
    q_out = reference_rope_write_kv(q, k, v, pos, table, kc, vc, slots, qw, kw, 1e-6)
    q_ref, k_ref = reference_rotary(reference_rms_norm(q, qw, 1e-6), reference_rms_norm(k, kw, 1e-6), pos, table)
    assert torch.equal(q_out, q_ref)
    assert torch.equal(kc.view(-1, K, H)[slots], k_ref)
    assert torch.equal(vc.view(-1, K, H)[slots], v)


def test_cpu_reads_refuse_a_tensor_off_the_cpu():
    """kernels/cpu_reads.py reads values on the host only for CPU tensors: on another device it would be the
    device->host sync its callers' branches must not make (a meta tensor stands in for one)."""
    from moelink.kernels.cpu_reads import cpu_item, cpu_nonzero

    assert cpu_nonzero(torch.tensor([False, True, True])).tolist() == [1, 2]
    assert cpu_item(torch.tensor(3)) == 3
    with pytest.raises(RuntimeError, match="CPU tensor only"):
        cpu_nonzero(torch.zeros(3, dtype=torch.bool, device="meta"))
    with pytest.raises(RuntimeError, match="CPU tensor only"):
        cpu_item(torch.zeros((), device="meta"))
