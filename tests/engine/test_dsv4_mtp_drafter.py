"""DeepSeek-V4's MTP layer as the speculative drafter (method "mtp": engine/spec/proposer/mtp.StreamsDraftLayer over
engine/models/deepseek_v4/mtp.py), on a tiny V4 with an MTP module in DeepSeek's published layout (`mtp.0.*`): random, or
built to draft the main model's bigram (tests/helpers/dsv4_mtp_checkpoint.bigram_dsv4_mtp: accepted often).

- Every draft the engine proposed equals an independent recomputation: transformers' own V4 gives the
  hyper-connection streams of the sequence (its last layer's output: the hyper-head's input), the MTP reference
  composed from transformers' classes (tests/helpers/dsv4_mtp_checkpoint.mtp_oracle) runs over the whole of it from
  scratch, then chains as the drafter does (its own output streams and its last draft, one position on). A random
  module's drafts depend on every part of the drafter: the streams it is handed, its paged window (catch-up over
  prefill chunks and over verify steps' rejected drafts, chained positions past the sequence), the accepted offsets.
- Greedy tokens with MTP drafts equal transformers' greedy decoding (float64; chunked prefill, several sequences a
  step, a pool small enough to preempt, then the same prompts again as prefix-cache hits): the main model's window
  and compressor rings rolled back past rejected drafts, the drafter's window rewritten; every block back.
"""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM

from tests.helpers.draft_spy import record_drafts
from tests.helpers.dsv4_checkpoint import VOCAB
from tests.helpers.dsv4_mtp_checkpoint import bigram_dsv4_mtp, mtp_oracle, save_dsv4_with_mtp
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, hf_greedy, prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("dsv4_mtp_drafter")
    random = save_dsv4_with_mtp(d / "random", moe_intermediate_size=32)
    return {"random": random, "bigram": bigram_dsv4_mtp(random, d / "bigram")}


def _kw(**extra):
    # 48-token steps chunk the longer prompts; 28 blocks of 8 tokens cannot hold every request at once (preemptions),
    # and keep some of the first pass's prompt blocks for the second (prefix hits).
    return dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=48, num_kv_blocks=28, block_size=8,
                num_state_checkpoints=16, **extra)


def test_greedy_with_mtp_drafts_equals_transformers_with_prefix_hits(checkpoints):
    """Drafts accepted and rejected (bigram MTP, k = 2)."""
    path = checkpoints["bigram"][0]
    ps = prompts(VOCAB, seed=21, n=6, lo=1, hi=120)
    want = hf_greedy(path, ps, 10)
    llm = LLM(path, speculative_config={"method": "mtp", "num_speculative_tokens": 2}, **_kw())
    assert_same(engine_greedy(llm, ps, 10), want, ps)
    stats = llm.engine.stats()
    assert stats.num_preemptions_total > 0
    hits = stats.prefix_cache_hits
    assert_same(engine_greedy(llm, ps, 10), want, ps)
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits > hits
    sd = stats.spec_decode
    print(f"V4 bigram MTP k=2: acceptance {sd.acceptance_rate:.3f} ({sd.num_accepted_tokens} of "
          f"{sd.num_draft_tokens} drafts; per position {sd.accepted_per_position})")
    assert 0.3 < sd.acceptance_rate < 1.0, sd  # accepted often, rejected too: both ways of the rollback run
    assert_pool_free(llm)


@pytest.mark.parametrize("module", ["random", "bigram"])
def test_mtp_drafts_equal_transformers_streams_chained_through_the_reference(checkpoints, module, monkeypatch):
    """random: drafts that depend on the streams (h_proj), seldom accepted; bigram: drafts accepted often, so the
    catch-up reads accepted offsets and the chain starts past them."""
    from transformers import AutoModelForCausalLM

    path, full, own = checkpoints[module]
    k = 3  # the most the tiny model's 4-slot CSA compressor ring can roll back
    seen = record_drafts(monkeypatch)
    ps = prompts(VOCAB, seed=17, n=4, lo=2, hi=40)
    llm = LLM(path, speculative_config={"method": "mtp", "num_speculative_tokens": k}, **_kw())
    engine_greedy(llm, ps, 8)
    assert len(seen) > 15
    sd = llm.engine.stats().spec_decode
    print(f"{module} V4 MTP k={k}: {sd.num_accepted_tokens} of {sd.num_draft_tokens} drafts accepted")
    assert module == "random" or sd.acceptance_rate > 0.3, sd
    main = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    ref = mtp_oracle(full, own)
    streams = []  # the hyper-head's input: the last layer's streams (transformers' hidden_states are not those)
    main.model.hc_head.register_forward_hook(lambda mod, args, out: streams.append(args[0][0]))
    wrong = []
    for tokens, drafts in seen:
        m = len(tokens) - 1  # x_m was just emitted: rows t = 0 .. m-1 read (h_t, x_{t+1})
        with torch.no_grad():
            main(torch.tensor([tokens[:m]]))
        h = streams.pop().to(torch.float64)
        rows_h, rows_tok, want = h, torch.tensor(tokens[1:]), []
        for _ in range(k):
            y, logits = ref(rows_h, rows_tok)
            d = int(logits[-1].argmax())
            want.append(d)
            rows_h, rows_tok = torch.cat([rows_h, y[-1:]]), torch.cat([rows_tok, torch.tensor([d])])
        if drafts != want:
            wrong.append((len(tokens), drafts, want))
    assert not wrong, f"{len(wrong)} of {len(seen)} drafts differ, e.g. {wrong[:3]}"


def test_published_formats_draft_and_decode_as_without_drafts(checkpoints, tmp_path):
    """The bigram checkpoint as DeepSeek publishes it (FP8 linears with ue8m0 scales, the MTP's e_proj / h_proj and
    block included; FP4 experts: tests/helpers/dsv4_published.py): the drafter loads the MTP's formats, its drafts
    are accepted, and greedy tokens equal the same checkpoint's without speculation."""
    from tests.helpers.dsv4_published import write_published_dsv4

    pub, _ = write_published_dsv4(checkpoints["bigram"][0], tmp_path / "published", tmp_path / "oracle")
    ps = prompts(VOCAB, seed=5, n=4, lo=1, hi=100)
    want = engine_greedy(LLM(pub, **_kw()), ps, 8)
    llm = LLM(pub, speculative_config={"method": "mtp", "num_speculative_tokens": 2}, **_kw())
    assert llm.engine.executor.worker.runner.plugin("speculative").device.layer.e_proj.weight.dtype == torch.float8_e4m3fn
    assert_same(engine_greedy(llm, ps, 8), want, ps)
    assert llm.engine.stats().spec_decode.acceptance_rate > 0.3
    assert_pool_free(llm)
