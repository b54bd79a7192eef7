"""Sampler tests against independent oracles: hand-worked allowed sets, a per-row
Python penalty reference, torch.log_softmax, and seeded single-row runs.

Shape legend: B rows, V vocabulary.
"""
from __future__ import annotations


import pytest
import torch

from moelink.engine.rank.sampler import Sampler, apply_penalties as _apply_penalties
from moelink.engine.contract.sampling_params import SamplingParams

from tests.helpers.sampler import LOGITS6, PROBS6, build, chi_square, draw_counts, sample


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    torch.manual_seed(0)
    logits_BV = torch.randn(8, 100).to(dtype)
    params = [SamplingParams(temperature=0.0)] * 8
    meta = build(params, logits_BV)
    # The all-greedy fast path builds nothing heavy.
    assert meta.all_greedy and meta.no_penalties and meta.no_min_tokens and meta.no_logprobs
    assert meta.temperature_B is None and meta.output_counts_BV is None and meta.top_k_B is None
    out = Sampler()(logits_BV, meta)
    assert torch.equal(out.token_ids_B, logits_BV.float().argmax(-1))
    assert out.token_ids_B.dtype == torch.long
    assert out.logprobs == [None] * 8


def test_temperature_zero_ignores_top_k_top_p_and_generator():
    torch.manual_seed(1)
    logits_BV = torch.randn(4, 30)
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.2, min_p=0.5)] * 4
    out = sample(params, logits_BV, gens=[gen, None, None, None])
    assert torch.equal(out.token_ids_B, logits_BV.argmax(-1))
    assert torch.equal(gen.get_state(), state), "a greedy row must not advance its generator"


def test_mixed_greedy_and_random_rows():
    torch.manual_seed(2)
    logits_BV = torch.randn(6, 40)
    # Row 1's random rows are restricted to one token (top_k=1), so every row is checkable.
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1)] * 3
    out = sample(params, logits_BV)
    assert torch.equal(out.token_ids_B, logits_BV.argmax(-1))


def test_logits_not_modified():
    torch.manual_seed(3)
    logits_BV = torch.randn(3, 20)
    before = logits_BV.clone()
    params = [
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.3, logprobs=2),
        SamplingParams(temperature=0.0, frequency_penalty=0.5, min_tokens=3),
        SamplingParams(presence_penalty=1.0),
    ]
    sample(params, logits_BV, outputs=[[1, 2], [3], [4, 4]], eos={0})
    assert torch.equal(logits_BV, before)


# ---------------------------------------------------------------- random sampling


def test_temperature_distribution_matches_softmax():
    torch.manual_seed(4)
    logits_V = torch.randn(5)
    for t in (1.0, 0.5, 2.0):
        counts = draw_counts(SamplingParams(temperature=t), logits_V, 40_000, seed=int(t * 10))
        # df = 4; P(chi2 > 25) ≈ 5e-5, so a correct sampler fails ~never.
        assert chi_square(counts, torch.softmax(logits_V / t, -1)) < 25.0


@pytest.mark.parametrize(
    "kw, allowed",
    [
        (dict(top_k=3), [1, 3, 5]),
        (dict(top_k=1), [1]),
        # cum best-first: .40, .65 >= .6 → stop after token 3.
        (dict(top_p=0.6), [1, 3]),
        (dict(top_p=0.3), [1]),
        # cum: .40 .65 .80 .90 >= .85
        (dict(top_p=0.85), [1, 3, 5, 0]),
        # min_p 0.3 → keep p >= 0.12: .40 .25 .15
        (dict(min_p=0.3), [1, 3, 5]),
        # min_p 0.2 → keep p >= 0.08: .40 .25 .15 .10
        (dict(min_p=0.2), [1, 3, 5, 0]),
        # min_p 0.2 keeps {1,3,5,0}; top_k 3 keeps {1,3,5} (mass .8);
        # renormalised .5 .3125 .1875 → cum .5, .8125 >= .8 → {1,3}.
        (dict(min_p=0.2, top_k=3, top_p=0.8), [1, 3]),
        # Same top_p without top_k: cum .40 .65 .80 >= .8 → {1,3,5}.
        (dict(min_p=0.2, top_p=0.8), [1, 3, 5]),
        # temperature 2 → p ∝ sqrt(p): .316 .632 .2 .5 .245 .387 (sum 2.28)
        # → .139 .277 .088 .219 .107 .170; top_p .5: .277, .496, .666 → {1,3,5}.
        (dict(temperature=2.0, top_p=0.5), [1, 3, 5]),
    ],
)
def test_filters_pick_exactly_the_allowed_set(kw, allowed):
    counts = draw_counts(SamplingParams(**kw), LOGITS6, 20_000)
    allowed_mask = torch.zeros(6, dtype=torch.bool)
    allowed_mask[allowed] = True
    assert counts[~allowed_mask].sum() == 0
    assert (counts[allowed_mask] > 0).all(), "every allowed token should be drawn in 20k tries"
    # Survivors keep their relative probabilities.
    t = kw.get("temperature", 1.0)
    expected = torch.softmax(LOGITS6 / t, -1) * allowed_mask
    assert chi_square(counts, expected / expected.sum()) < 30.0


@pytest.mark.parametrize(
    "kw", [dict(top_k=-1), dict(top_k=0), dict(top_k=6), dict(top_k=100), dict(top_p=1.0), dict(min_p=0.0)]
)
def test_disabled_filters_keep_everything(kw):
    meta = build([SamplingParams(**kw)], LOGITS6.unsqueeze(0))
    assert meta.top_k_B is None and meta.top_p_B is None and meta.min_p_B is None
    counts = draw_counts(SamplingParams(**kw), LOGITS6, 20_000)
    assert chi_square(counts, PROBS6) < 30.0


def test_per_row_filters_in_one_batch():
    # Rows with different (and disabled) settings share the batched top-k / sort paths.
    torch.manual_seed(5)
    n = 4000
    row_params = [SamplingParams(top_k=2), SamplingParams(), SamplingParams(top_k=3, top_p=0.7), SamplingParams(top_p=0.3)]
    allowed = [{1, 3}, set(range(6)), {1, 3}, {1}]
    params = row_params * n
    out = sample(params, LOGITS6.expand(len(params), -1).contiguous())
    toks = out.token_ids_B.view(n, 4)
    for r in range(4):
        assert set(toks[:, r].tolist()) == allowed[r]


# ---------------------------------------------------------------- penalties


def reference_penalties(logits_V: list[float], p: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    """Plain per-row Python, written from the HF/vLLM definitions."""
    out = list(logits_V)
    seen = set(prompt) | set(output)
    for tok in range(len(out)):
        if tok in seen:
            out[tok] = out[tok] / p.repetition_penalty if out[tok] > 0 else out[tok] * p.repetition_penalty
        c = output.count(tok)
        out[tok] -= p.frequency_penalty * c
        out[tok] -= p.presence_penalty * (1 if c > 0 else 0)
    return out


def test_penalties_match_python_reference():
    g = torch.Generator().manual_seed(6)
    B, V = 6, 32
    logits_BV = torch.randn(B, V, generator=g) * 3
    rand = lambda n: torch.randint(0, V, (n,), generator=g).tolist()  # noqa: E731
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(repetition_penalty=0.7, frequency_penalty=0.4),
        SamplingParams(frequency_penalty=-0.8, presence_penalty=1.2),
        SamplingParams(),  # no penalty in a penalised batch
        SamplingParams(temperature=0.0, repetition_penalty=1.2, presence_penalty=-0.5, frequency_penalty=2.0),
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.3),
    ]
    prompts = [rand(10), rand(3), rand(0), rand(5), rand(20), rand(7)]
    outputs = [rand(6), rand(0), rand(12), rand(4), rand(9), rand(1)]
    meta = build(params, logits_BV, prompts=prompts, outputs=outputs)
    assert not meta.no_penalties and meta.seen_mask_BV is not None
    got = logits_BV.clone()
    _apply_penalties(got, meta)
    for i in range(B):
        want = reference_penalties(logits_BV[i].tolist(), params[i], prompts[i], outputs[i])
        torch.testing.assert_close(got[i], torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_penalties_change_greedy_choice():
    # Token 2 leads, but it was already generated twice.
    logits_BV = torch.tensor([[0.0, 1.0, 2.0, 0.5]] * 3)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=2.5),  # 2 → 0.8 < 1.0
        SamplingParams(temperature=0.0, frequency_penalty=0.6),  # 2 - 1.2 = 0.8
        SamplingParams(temperature=0.0, presence_penalty=0.6),  # 2 - 0.6 = 1.4
    ]
    out = sample(params, logits_BV, outputs=[[2, 2]] * 3)
    assert out.token_ids_B.tolist() == [1, 1, 2]


def test_repetition_penalty_uses_prompt_but_frequency_does_not():
    logits_BV = torch.tensor([[0.0, 1.0, 2.0, 0.5]] * 2)
    params = [SamplingParams(temperature=0.0, repetition_penalty=4.0), SamplingParams(temperature=0.0, frequency_penalty=2.0)]
    out = sample(params, logits_BV, prompts=[[2], [2]])
    assert out.token_ids_B.tolist() == [1, 2]


def test_penalty_inputs_built_only_when_needed():
    logits_BV = torch.zeros(2, 8)
    meta = build([SamplingParams(), SamplingParams(temperature=0.0)], logits_BV, outputs=[[1], [2]])
    assert meta.no_penalties and meta.output_counts_BV is None and meta.seen_mask_BV is None
    meta = build([SamplingParams(frequency_penalty=0.5), SamplingParams()], logits_BV, prompts=[[3], [4]], outputs=[[1, 1, 9], [2]])
    assert meta.seen_mask_BV is None  # no repetition penalty: prompts are not scanned
    # Token 9 is outside the vocabulary and ignored.
    assert meta.output_counts_BV[0].tolist() == [0, 2, 0, 0, 0, 0, 0, 0]


# ---------------------------------------------------------------- min_tokens


def test_min_tokens_blocks_eos_and_stop_ids():
    # Eos (0) and stop id 3 dominate; everything else is equal.
    logits_V = torch.tensor([9.0, 0.0, 0.0, 8.0, 0.0, 0.0])
    eos = {0}
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[3])
    logits_BV = logits_V.expand(3, -1).contiguous()
    outs = [[7], [7, 7], [7, 7, 7]]
    got = sample([p] * 3, logits_BV, outputs=outs, eos=eos).token_ids_B.tolist()
    assert got[0] not in (0, 3) and got[1] not in (0, 3)
    assert got[2] == 0  # min_tokens reached: eos allowed again

    # Random rows: never eos/stop while below min_tokens.
    n = 2000
    pr = SamplingParams(min_tokens=1, stop_token_ids=[3])
    toks = sample([pr] * n, logits_V.expand(n, -1).contiguous(), eos=eos).token_ids_B
    assert not ((toks == 0) | (toks == 3)).any()


def test_min_tokens_with_ignore_eos_blocks_only_stop_ids():
    # As vLLM: with ignore_eos the eos id does not stop, so min_tokens leaves it alone.
    logits_BV = torch.tensor([[9.0, 0.0, 8.0, 0.0]])
    p = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True, stop_token_ids=[2])
    assert sample([p], logits_BV, eos={0}).token_ids_B.tolist() == [0]
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2])
    assert sample([p], logits_BV, eos={0}).token_ids_B.tolist() == [1]


# ---------------------------------------------------------------- logprobs


def test_logprobs_match_log_softmax_of_raw_logits():
    torch.manual_seed(7)
    B, V = 5, 50
    logits_BV = (torch.randn(B, V) * 2).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.8, top_k=10, logprobs=3, repetition_penalty=1.5),
        SamplingParams(),  # no logprobs
        SamplingParams(temperature=0.0, logprobs=0, frequency_penalty=2.0),
        SamplingParams(temperature=1.2, logprobs=20),
    ]
    out = sample(params, logits_BV, outputs=[[1, 2]] * B, prompts=[[3]] * B)
    ref_BV = torch.log_softmax(logits_BV.float(), -1)  # raw: before penalties and temperature
    assert out.logprobs[2] is None
    for i, p in enumerate(params):
        if p.logprobs is None:
            continue
        lp = out.logprobs[i]
        tok = out.token_ids_B[i].item()
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(ref_BV[i, tok].item(), abs=1e-6)
        assert lp.rank == 1 + int((ref_BV[i] > ref_BV[i, tok]).sum())
        assert len(lp.top) == p.logprobs
        ref_top = torch.topk(ref_BV[i], p.logprobs)
        assert [t for t, _ in lp.top] == ref_top.indices.tolist()
        assert [x for _, x in lp.top] == pytest.approx(ref_top.values.tolist(), abs=1e-6)
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))
    assert out.logprobs[0].rank == 1  # greedy, no penalties: the best token


def test_logprob_rank_of_a_penalised_choice():
    # Greedy picks token 1 only because token 2 is penalised; the raw rank is 2.
    logits_BV = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    p = SamplingParams(temperature=0.0, presence_penalty=2.0, logprobs=2)
    lp = sample([p], logits_BV, outputs=[[2]]).logprobs[0]
    assert (lp.token_id, lp.rank) == (1, 2)
    assert [t for t, _ in lp.top] == [2, 1]
