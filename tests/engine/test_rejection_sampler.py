"""Speculative decoding's acceptance rule (engine/spec/rejection.py): greedy output equals plain greedy
decoding, and sampled output is distributed exactly as the target, for drafters that are sometimes wrong."""
from __future__ import annotations

import pytest
import torch

from moelink.engine.spec.rejection import DraftRows, rejection_sample

V = 5
# Chi-square critical value for 4 degrees of freedom at p = 0.001: a correct sampler fails this once in 1000
# seeds; the seeds are fixed, so the test is deterministic.
CHI2_4DF_999 = 18.467


def _chi2(tokens: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=V).double()
    expected = p.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_keeps_the_drafts_while_they_are_the_argmax_then_adds_the_argmax():
    # Three requests: 2 drafts (first right, second wrong), 2 drafts (both right), 0 drafts.
    probs = torch.tensor([
        [0.1, 0.6, 0.1, 0.1, 0.1],  # r0 pos 1: argmax 1 (draft 1: kept)
        [0.5, 0.1, 0.1, 0.2, 0.1],  # r0 pos 2: argmax 0 (draft 3: rejected -> 0)
        [0.1, 0.1, 0.1, 0.1, 0.6],  # r0 bonus (not reached)
        [0.1, 0.1, 0.6, 0.1, 0.1],  # r1 pos 1: argmax 2 (draft 2)
        [0.1, 0.1, 0.1, 0.6, 0.1],  # r1 pos 2: argmax 3 (draft 3)
        [0.6, 0.1, 0.1, 0.1, 0.1],  # r1 bonus: 0
        [0.1, 0.1, 0.1, 0.1, 0.6],  # r2 bonus: 4
    ])
    out = rejection_sample(probs, DraftRows((2, 2, 0)), torch.tensor([1, 3, 2, 3]), None,
                           torch.tensor([True, True, True]))
    assert out.to_lists() == [[1, 0], [2, 3, 0], [4]]
    assert out.num_accepted_R.tolist() == [1, 2, 0]


def _target():
    g = torch.Generator().manual_seed(7)
    return [torch.softmax(torch.randn(V, generator=g) * 1.5, 0) for _ in range(3)]


@pytest.mark.parametrize("drafter", ["deterministic", "stochastic"])
def test_sampled_output_is_distributed_as_the_target(drafter):
    """20k requests, 2 drafts each, the target the same at every request: the first emitted token follows p1, the
    second (where the first draft was kept) p2, the third (both kept) p3, whatever the drafter proposed."""
    n = 20_000
    p1, p2, p3 = _target()
    torch.manual_seed(1234)
    if drafter == "deterministic":
        # Always proposes p1's likeliest token, then p2's second likeliest (right sometimes, wrong often).
        drafts = torch.stack([p1.argmax(), p2.topk(2).indices[1]]).repeat(n)
        draft_probs = None
    else:
        q1 = 0.5 * p1 + 0.5 * torch.tensor([0.4, 0.05, 0.05, 0.1, 0.4])  # near the target, not equal
        q2 = torch.full((V,), 1.0 / V)
        d1, d2 = torch.multinomial(q1, n, replacement=True), torch.multinomial(q2, n, replacement=True)
        drafts = torch.stack([d1, d2], 1).reshape(-1)
        draft_probs = torch.stack([q1, q2]).repeat(n, 1)
    probs = torch.stack([p1, p2, p3]).repeat(n, 1)
    out = rejection_sample(probs, DraftRows((2,) * n), drafts, draft_probs, torch.zeros(n, dtype=torch.bool))
    ids, count = out.token_ids_RK1, out.num_tokens_R
    assert _chi2(ids[:, 0], p1) < CHI2_4DF_999
    first_kept = count >= 2
    assert first_kept.sum() > 2000
    assert _chi2(ids[first_kept, 1], p2) < CHI2_4DF_999
    both_kept = count == 3
    assert both_kept.sum() > 500
    assert _chi2(ids[both_kept, 2], p3) < CHI2_4DF_999
    # The emitted tokens stop right after the first replacement: nothing after it.
    assert bool((ids[count == 1, 1:] == -1).all()) and bool((ids[count == 2, 2] == -1).all())


def test_a_seeded_request_emits_the_same_tokens_whatever_shares_the_batch():
    p1, p2, p3 = _target()
    mine = torch.stack([p1, p2, p3])
    other = torch.full((4, V), 1.0 / V)  # another request with 3 drafts

    def run(first: bool, seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        if first:
            rows, probs = DraftRows((2, 3)), torch.cat([mine, other])
            drafts, me = torch.tensor([0, 1, 4, 4, 4]), 0
        else:
            rows, probs = DraftRows((3, 2)), torch.cat([other, mine])
            drafts, me = torch.tensor([4, 4, 4, 0, 1]), 1
        torch.manual_seed(99 if first else 5)  # the unseeded request draws something else each time
        out = rejection_sample(probs, rows, drafts, None, torch.zeros(2, dtype=torch.bool), {me: gen})
        return out.to_lists()[me]

    for seed in range(20):
        assert run(True, seed) == run(False, seed)


def test_rows_that_do_not_match_the_layout_are_refused():
    with pytest.raises(ValueError, match="do not match DraftRows"):
        rejection_sample(torch.full((3, V), 0.2), DraftRows((1,)), torch.tensor([0]), None, torch.tensor([False]))
    with pytest.raises(ValueError, match="num_draft"):
        DraftRows((1, -1))


def test_penalties_at_each_verified_position_count_the_drafts_before_it():
    """engine/spec/verify.py: position j of a verifying row is penalised as if its drafts 0 .. j-1 were
    already output tokens (what plain decoding would have counted there)."""
    from types import SimpleNamespace

    from moelink.engine.rank.sampler import apply_penalties
    from moelink.engine.spec.verify import PositionPenalties, prefix_draft_pairs

    counts_RV = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0]])
    prompt_seen_RV = torch.tensor([[False, False, False, False, True], [False] * 5])
    meta = SimpleNamespace(
        repetition_penalty_B=torch.tensor([1.5, 1.0]), frequency_penalty_B=torch.tensor([0.5, 0.25]),
        presence_penalty_B=torch.tensor([0.1, 1.0]),
        penalty_tensors=lambda: (counts_RV, prompt_seen_RV | (counts_RV > 0)))
    drafts = [[3, 3], [1]]  # row 0: 2 drafts (3 positions), row 1: 1 draft (2 positions)
    reps = torch.tensor([3, 2])
    pen = PositionPenalties(meta, reps, prefix_draft_pairs(drafts), torch.device("cpu"))
    counts_BV, seen_BV = pen.penalty_tensors()
    want = torch.tensor([[1.0, 0, 0, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 2, 0], [0, 0, 2, 0, 0], [0, 1, 2, 0, 0]])
    assert torch.equal(counts_BV, want)
    assert seen_BV[:, 4].tolist() == [True, True, True, False, False] and seen_BV[2, 3] and not seen_BV[0, 3]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, V, generator=g)
    got = logits.clone()
    apply_penalties(got, pen)
    for b, r in enumerate([0, 0, 0, 1, 1]):  # each position as a one-row plain step with its own counts
        one = logits[b:b + 1].clone()
        apply_penalties(one, SimpleNamespace(
            repetition_penalty_B=meta.repetition_penalty_B[r:r + 1], frequency_penalty_B=meta.frequency_penalty_B[r:r + 1],
            presence_penalty_B=meta.presence_penalty_B[r:r + 1],
            penalty_tensors=lambda b=b: (want[b:b + 1], seen_BV[b:b + 1])))
        assert torch.allclose(got[b], one[0])
