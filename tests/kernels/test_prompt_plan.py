"""The plain-torch paged attention's fresh-prompt groups (kernels/prompt_plan.py): a step's prompt chunks with no
cached prefix run as padded groups, one causal SDPA each, and give what each sequence run alone gives; stale and
NaN cache contents past a sequence's end never reach a real row."""
import itertools
import random

import pytest
import torch

from moelink.kernels import prompt_plan
from moelink.kernels.attention import AttentionMetadata, reference_paged_attention
from moelink.kernels.step_memo import STEP_MEMO

N, K, H, L, B, M = 4, 2, 8, 4, 64, 8


def _step(query_lens, seq_lens, dtype=torch.float64, seed=0):
    """A step's q, caches and metadata; every cache position no sequence owns (past its end in its last block,
    unused blocks) is NaN."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(B, L, K, H, generator=gen, dtype=torch.float64)
    v_cache = torch.randn(B, L, K, H, generator=gen, dtype=torch.float64)
    blocks = list(range(B - 1))
    random.Random(seed).shuffle(blocks)
    tables = torch.zeros(len(seq_lens), M, dtype=torch.int32)
    owned = torch.zeros(B, L, dtype=torch.bool)
    for s, ctx in enumerate(seq_lens):
        for j in range(-(-ctx // L)):
            b = blocks.pop()
            tables[s, j] = b
            owned[b, : min(L, ctx - j * L)] = True
    k_cache[~owned], v_cache[~owned] = float("nan"), float("nan")
    k_cache[-1], v_cache[-1] = 0.0, 0.0  # the null block
    T = sum(query_lens)
    q = torch.randn(T, N, H, generator=gen, dtype=torch.float64)
    qsl = torch.tensor(list(itertools.accumulate(query_lens, initial=0)), dtype=torch.int32)
    meta = AttentionMetadata(qsl, torch.tensor(seq_lens, dtype=torch.int32), tables, torch.zeros(T, dtype=torch.long),
                             list(query_lens), list(seq_lens), max(query_lens), max(seq_lens), B - 1)
    return q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), meta


def _alone(q, k_cache, v_cache, meta, **kw):
    """Each sequence as a batch of its own (no group can form)."""
    outs = []
    for s in range(meta.num_seqs):
        STEP_MEMO.clear()
        t0, t1 = int(meta.query_start_loc_S1[s]), int(meta.query_start_loc_S1[s + 1])
        outs.append(reference_paged_attention(q[t0:t1], k_cache, v_cache, meta.select(s, s + 1), 0.3, **kw))
    return torch.cat(outs)


@pytest.mark.parametrize("query_lens,seq_lens", [
    ([5, 5, 5], [5, 5, 5]),  # equal and consecutive: views, no gathers of q
    ([5, 7, 1, 6, 3, 3], [5, 7, 9, 6, 3, 8]),  # ragged, a decode row and a chunk after a cached prefix between
    ([9, 10, 11, 12, 2], [9, 10, 11, 12, 2]),  # padded groups and a sequence left alone
    ([6, 2, 6, 2], [6, 2, 6, 2]),  # equal lengths, not consecutive
])
def test_groups_give_each_sequence_alone(query_lens, seq_lens):
    q, k_cache, v_cache, meta = _step(query_lens, seq_lens)
    STEP_MEMO.clear()
    got = reference_paged_attention(q, k_cache, v_cache, meta, 0.3)
    want = _alone(q, k_cache, v_cache, meta)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_groups_with_an_fp8_cache_widen_as_the_single_path():
    q, k_cache, v_cache, meta = _step([4, 4, 3, 4], [4, 4, 3, 4], dtype=torch.float32)
    k8 = k_cache.nan_to_num(0.0).to(torch.float8_e4m3fn)
    v8 = v_cache.nan_to_num(0.0).to(torch.float8_e4m3fn)
    STEP_MEMO.clear()
    got = reference_paged_attention(q, k8, v8, meta, 0.3, k_scale=0.5, v_scale=2.0)
    want = _alone(q, k8, v8, meta, k_scale=0.5, v_scale=2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_padding_is_bounded_by_the_work_it_adds():
    assert prompt_plan.group_by_padding([64] * 5) == [[0, 1, 2, 3, 4]]
    groups = prompt_plan.group_by_padding([9, 10, 11, 12, 2, 64, 64, 3])
    assert sorted(i for g in groups for i in g) == list(range(8))
    lengths = [9, 10, 11, 12, 2, 64, 64, 3]
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert len(g) * longest ** 2 <= prompt_plan.PAD_WORK * sum(lengths[i] ** 2 for i in g)
    assert [0, 1, 2] in groups and [5, 6] in groups  # 9, 10, 11 pad within the bound; 12 would not
    rows = prompt_plan.MAX_GROUP_ROWS // 64
    assert [len(g) for g in prompt_plan.group_by_padding([64] * (rows + 1))] == [rows, 1]


def test_a_window_or_sinks_keeps_the_single_path(monkeypatch):
    """Groups serve plain causal attention only: a window or sinks runs each chunk alone, as before."""
    calls = []
    monkeypatch.setattr("moelink.kernels.attention.prompt_groups", lambda *a: calls.append(a) or [])
    q, k_cache, v_cache, meta = _step([4, 4], [4, 4])
    STEP_MEMO.clear()
    reference_paged_attention(q, k_cache, v_cache, meta, 0.3, sliding_window=3)
    reference_paged_attention(q, k_cache, v_cache, meta, 0.3, sinks_N=torch.zeros(N, dtype=q.dtype))
    assert calls == []
    reference_paged_attention(q, k_cache, v_cache, meta, 0.3)
    assert len(calls) == 1
