"""`--speculative-config` (engine/config/speculative.py) and the n-gram drafter (engine/spec/proposer/ngram.py)."""
from __future__ import annotations

import numpy as np
import pytest

from moelink.engine.config.speculative import SpeculativeConfig
from moelink.engine.spec.proposer.ngram import NgramProposer


def test_vllm_spellings_parse():
    cfg = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert (cfg.method, cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min) == ("ngram", 3, 5, 1)
    assert SpeculativeConfig.parse({"method": "deepseek_mtp", "num_speculative_tokens": 1}).method == "mtp"
    assert SpeculativeConfig.parse(None) is None
    eagle = SpeculativeConfig.parse({"method": "eagle3", "model": "heads/eagle3", "num_speculative_tokens": 2})
    assert eagle.model == "heads/eagle3"


@pytest.mark.parametrize("value, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "method='medusa' is invalid: choose from ngram, mtp, eagle3"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens=0 is invalid: must be an integer in \[1, 8\]"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens=True is invalid"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3},
     r"prompt_lookup_min=5 is invalid: must be an integer in \[1, 3\]"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tp": 2}, "unknown key.*draft_tp"),
    ({"method": "eagle3", "num_speculative_tokens": 2}, "model is required for method 'eagle3'"),
    ({"method": "mtp", "num_speculative_tokens": 2, "model": "x"},
     "model='x' is invalid for method 'mtp': it names a draft checkpoint directory for 'eagle3' or 'dspark' only"),
    ({"method": "dspark", "num_speculative_tokens": 2, "model": ""}, "model='' is invalid for method 'dspark'"),
])
def test_bad_values_name_the_key_and_what_is_allowed(value, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(value)


def test_ngram_proposes_what_followed_the_most_recent_earlier_occurrence():
    p = NgramProposer(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1)
    #                 0  1  2  3  4  5  6  7  8  9 10
    toks = np.array([5, 6, 7, 8, 9, 5, 6, 7, 1, 5, 6])
    # Suffix (5, 6) occurs at 0 and 5; the most recent (5) is followed by 7, 1, 5.
    assert p.propose(toks) == [7, 1, 5]
    assert p.propose(toks, max_tokens=1) == [7]
    # The longest n wins: suffix (6, 7, 1)? no; (7, 1)? no: with tokens ... 7 1 the 1-gram (1,) never occurred
    # before, so nothing is drafted.
    assert p.propose(np.array([3, 4, 7, 1])) == []
    # Near the end: fewer than k tokens follow the match.
    assert p.propose(np.array([2, 9, 2])) == [9, 2]
    assert p.propose(np.array([4])) == []
