"""vLLM's per-request logits processors (issue 79, item 9): `SamplingParams.logit_bias`, `allowed_token_ids` and
`bad_words`, checked where they are made and at intake, applied by the rank's sampler (engine/rank/logits_rules.py).

Oracles: a plain-torch reference of each rule's effect on random logits (the sampler fed from the persistent batch,
as the runner feeds it, over steps whose sampled tokens feed the bad words' prefixes); and on the engine, in both step
loops, what the rules promise (a +100 bias forces its token, only allowed ids come out, a banned word's tokens never
follow each other) against the same requests without them, and a batch mixing requests with and without them, whose
plain requests come out as they do alone.
"""
from __future__ import annotations

import re

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.core.logits_rules import bad_words_token_ids
from moelink.engine.rank.input_batch import CachedRequestState, PersistentBatch
from moelink.engine.rank.sampler import Sampler
from moelink.engine.rank.sampling_metadata import SamplingMetadata

V = 64


# -- SamplingParams ---------------------------------------------------------------------------------------------------
def test_fields_are_taken_and_read_as_vllm_reads_them():
    p = SamplingParams(logit_bias={"5": 2, 7: -1.5}, allowed_token_ids=(1, 2), bad_words=["a", "b", "a"],
                       spaces_between_special_tokens=False, extra_args={"k": [1, 2]})
    assert p.logit_bias == {5: 2.0, 7: -1.5} and p.allowed_token_ids == [1, 2] and p.bad_words == ["a", "b"]
    assert p.spaces_between_special_tokens is False and p.extra_args == {"k": [1, 2]}
    assert SamplingParams().top_k == 0 and SamplingParams(top_k=-1).top_k == -1  # vLLM 0.32: 0 off, -1 taken
    assert not SamplingParams().logits_rules and SamplingParams(logit_bias={1: 1.0}).logits_rules
    assert SamplingParams().bad_words == [] and SamplingParams(bad_words=None).bad_words == []  # vLLM 0.32's default


@pytest.mark.parametrize("kw, field", [
    (dict(logit_bias={"x": 1.0}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={3: float("nan")}), "logit_bias[3]"), (dict(logit_bias={3: float("inf")}), "logit_bias[3]"),
    (dict(logit_bias=[1]), "logit_bias"), (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=[1, -2]), "allowed_token_ids"), (dict(bad_words=["ok", ""]), "bad_words"),
    (dict(bad_words="word"), "bad_words"), (dict(extra_args={"n": 1 << 64}), "extra_args"),
    (dict(extra_args=[1]), "extra_args"), (dict(spaces_between_special_tokens=1), "spaces_between_special_tokens"),
])
def test_bad_values_are_one_error_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{re.escape(field)}="):
        SamplingParams(**kw)


class _Tok:
    """A tokenizer of single characters (id = ord - 96; a space is id 30)."""

    def encode(self, text, add_special_tokens=False):
        return [30 if c == " " else ord(c) - 96 for c in text]


def test_bad_words_tokenized_with_and_without_a_leading_space_as_vllm():
    # The spaced form is another word of as many tokens only if it tokenizes to as many: here it is one longer.
    assert bad_words_token_ids(_Tok(), ["ab", " c"], V) == [[1, 2], [3]]
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        bad_words_token_ids(_Tok(), ["z"], 20)


def test_refused_with_speculative_decoding_not_ignored():
    from types import SimpleNamespace

    from moelink.engine.core.logits_rules import checked_logits_rules

    engine = SimpleNamespace(config=SimpleNamespace(model=SimpleNamespace(vocab_size=V), speculative=object()),
                             tokenizer=_Tok())
    plain = SamplingParams()
    assert checked_logits_rules(engine, plain) is plain
    for kw, field in ((dict(logit_bias={1: 1.0}), "logit_bias"), (dict(allowed_token_ids=[1]), "allowed_token_ids"),
                      (dict(bad_words=["ab"]), "bad_words")):
        with pytest.raises(ValueError, match=rf"^SamplingParams\.{field} is not supported with speculative decoding"):
            checked_logits_rules(engine, SamplingParams(**kw))
    engine.config.speculative = None
    shared = SamplingParams(bad_words=["ab"])
    got = checked_logits_rules(engine, shared)
    assert got.bad_words_token_ids == [[1, 2]] and shared.bad_words_token_ids is None  # the caller's is not changed


# -- the sampler against a plain-torch reference ----------------------------------------------------------------------
def _reference(logits_BV, params, outputs):
    """Each rule's effect as vLLM's processors have it, row by row in plain torch."""
    out = logits_BV.clone()
    for i, (p, past) in enumerate(zip(params, outputs)):
        row = out[i]
        if p.allowed_token_ids is not None:
            keep = torch.zeros(V, dtype=torch.bool)
            keep[p.allowed_token_ids] = True
            row[~keep] = float("-inf")
        for word in p.bad_words_token_ids or []:
            if len(word) <= len(past) + 1 and (len(word) == 1 or past[-(len(word) - 1):] == word[:-1]):
                row[word[-1]] = float("-inf")
        for t, b in (p.logit_bias or {}).items():
            row[t] += b
    return out


def _params(**kw) -> SamplingParams:
    words = kw.pop("words", None)
    p = SamplingParams(temperature=0.0, **kw)
    p.bad_words_token_ids = words  # what intake sets (engine/core/logits_rules.py)
    return p


def test_sampler_applies_the_rules_as_the_reference_over_steps():
    """Rows with and without rules in one persistent batch; each step's sampled tokens feed the next step's bad-word
    prefixes on the device (as the overlapped loop leaves them), a row joins late and one leaves."""
    gen = torch.Generator().manual_seed(0)
    params = [_params(), _params(logit_bias={3: 5.0, 9: -100.0}), _params(allowed_token_ids=[2, 5, 11, 40]),
              _params(words=[[4], [7, 8], [1, 7, 8], [6, 8]]), _params(logit_bias={8: 50.0}, words=[[8, 8, 8]],
                                                                       allowed_token_ids=list(range(0, V, 2)))]
    batch = PersistentBatch(V, torch.device("cpu"), capacity=2)  # grows on the way
    states = []
    for i, p in enumerate(params[:4]):
        st = CachedRequestState(f"r{i}", [1, 2, 3], [7] if i == 3 else [], p, [0], 0, None)
        batch.add(st)
        states.append(st)
    sampler = Sampler()
    for step in range(6):
        if step == 2:  # a request that resumes with outputs already: its tail is filled from them
            st = CachedRequestState("late", [1], [8, 8], params[4], [0], 0, None)
            batch.add(st)
            states.append(st)
        if step == 4:
            batch.remove(states.pop(1))
        batch.apply_device_ops(batch.take_device_ops())
        logits = torch.randn(len(states), V, generator=gen) * 3
        logits[:, 8] += 4.0  # token 8 is often the argmax, so the words ending in it are tested
        meta = SamplingMetadata.from_batch(batch, batch.rows_of(states), states, set(), torch.device("cpu"))
        tokens = sampler(logits, meta).token_ids_B
        meta.record_penalised(tokens)
        want = _reference(logits, [st.params for st in states], [st.output_token_ids for st in states])
        assert tokens.tolist() == want.argmax(-1).tolist(), f"step {step}"
        for st, t in zip(states, tokens.tolist()):
            st.output_token_ids.append(t)


def test_a_step_without_rules_builds_nothing():
    batch = PersistentBatch(V, torch.device("cpu"))
    st = CachedRequestState("a", [1], [], _params(), [0], 0, None)
    batch.add(st)
    meta = SamplingMetadata.from_batch(batch, batch.rows_of([st]), [st], set(), torch.device("cpu"))
    assert meta.logits_rules is None and batch.rules is None and batch.take_device_ops() == []
    ruled = CachedRequestState("b", [1], [], _params(logit_bias={1: 1.0}), [0], 0, None)
    batch.add(ruled)
    batch.remove(ruled)
    assert batch.num_rules == 0 and int(batch.rules_slot_R.max()) == -1


# -- the engine, both step loops ---------------------------------------------------------------------------------------
KW = dict(dtype="float32", max_num_seqs=8, num_kv_blocks=128, max_model_len=128)
PROMPTS = ["Hello world", "The cat sat", [5, 6, 7, 8, 9]]


@pytest.fixture(scope="module", params=[False, True], ids=["serial", "overlapped"])
def llm(tiny_model, request):
    with LLM(tiny_model("qwen3_e6k3"), async_scheduling=request.param, **KW) as llm:
        yield llm


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, **kw)


def _ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_a_bias_of_100_forces_its_token_and_plain_requests_are_unchanged(llm):
    plain = _ids(llm.generate(PROMPTS, _greedy(), use_tqdm=False))
    mixed = _ids(llm.generate(PROMPTS, [_greedy(logit_bias={77: 100.0}), _greedy(), _greedy(logit_bias={3: -100.0})],
                              use_tqdm=False))
    assert mixed[0] == [77] * 12
    assert mixed[1] == plain[1]  # the row without rules beside two with them
    assert 3 not in mixed[2]


def test_allowed_token_ids_only(llm):
    allowed = [11, 23, 42, 300]
    outs = llm.generate(PROMPTS, [SamplingParams(temperature=1.0, seed=s, max_tokens=16, ignore_eos=True,
                                                 allowed_token_ids=allowed) for s in range(3)], use_tqdm=False)
    assert all(set(ids) <= set(allowed) for ids in _ids(outs))
    assert len({t for ids in _ids(outs) for t in ids}) > 1  # sampled among them, not one forced id


def _a_word_of(tok, ids: list[int]) -> tuple[str, int]:
    """A 2-token word of the greedy output whose text tokenizes back to exactly those tokens, and where it starts."""
    for k in range(1, len(ids) - 1):
        text = tok.decode(ids[k:k + 2])
        if text.strip() and tok.encode(text.lstrip(), add_special_tokens=False) == ids[k:k + 2]:
            return text.lstrip(), k
    pytest.skip("no 2-token word in the greedy output re-tokenizes to itself")


def test_a_bad_word_never_appears_and_only_its_last_token_is_blocked(llm):
    """The greedy output is the plain one up to the word's last token, which is blocked once its prefix was
    sampled (in the overlapped loop that prefix token is still on the device when the step is planned)."""
    tok = llm.get_tokenizer()
    plain = _ids(llm.generate(PROMPTS[0], _greedy(), use_tqdm=False))[0]
    word, k = _a_word_of(tok, plain)
    banned = _ids(llm.generate([PROMPTS[0], PROMPTS[1]], [_greedy(bad_words=[word]), _greedy()], use_tqdm=False))
    assert banned[0][:k + 1] == plain[:k + 1] and banned[0][k + 1] != plain[k + 1]
    seqs = bad_words_token_ids(tok, [word], llm.engine.config.model.vocab_size)
    for seq in seqs:
        assert not any(banned[0][i:i + len(seq)] == seq for i in range(len(banned[0])))
    assert banned[1] == _ids(llm.generate(PROMPTS[1], _greedy(), use_tqdm=False))[0]


def test_out_of_vocabulary_ids_are_refused_at_intake(llm):
    vocab = llm.engine.config.model.vocab_size
    for kw, field in ((dict(logit_bias={vocab: 1.0}), "logit_bias"), (dict(allowed_token_ids=[1, vocab]),
                                                                       "allowed_token_ids")):
        with pytest.raises(ValueError, match=rf"SamplingParams\.{field} has token ids \[{vocab}\]"):
            llm.generate("hi", _greedy(**kw), use_tqdm=False)
    assert not llm.engine.has_requests()


def test_max_tokens_past_the_context_is_capped_as_vllms_offline_llm(llm):
    out = llm.generate([list(range(5, 125))], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8 and out.outputs[0].finish_reason == "length"


def test_the_chosen_token_comes_first_in_the_logprob_dicts(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logprobs=1,
                                                  prompt_logprobs=1), use_tqdm=False)[0]
    firsts = [next(iter(e)) for e in out.prompt_logprobs[1:]]
    assert firsts == out.prompt_token_ids[1:]
    assert [next(iter(e)) for e in out.outputs[0].logprobs] == out.outputs[0].token_ids
