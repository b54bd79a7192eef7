"""Structured output under expert parallelism (Ray, 2 ranks): each rank's SchedulerOutput carries the
bitmasks of its own rows; constrained outputs are valid and, greedy, the same as on one rank."""
from __future__ import annotations

import json

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.contract.structured_output_params import StructuredOutputParams

pytestmark = pytest.mark.slow
pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"k": {"enum": ["a", "b", "c"]}, "v": {"type": "integer", "minimum": 0,
                                                                               "maximum": 99}},
          "required": ["k", "v"], "additionalProperties": False}
ENGINE_KW = dict(dtype="float64", max_num_seqs=8, num_kv_blocks=128, block_size=16)


def test_ep_constrained_outputs_valid_and_match_one_rank(local_ray, tiny_model):
    path = tiny_model("qwen3_e6k3")
    so = StructuredOutputParams(json=SCHEMA)
    prompts = [[5 + i, 17, 40 + 3 * i] for i in range(8)]
    greedy = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=so)
    with LLM(path, **ENGINE_KW) as one:
        want = [o.outputs[0].token_ids for o in one.generate(prompts, greedy, use_tqdm=False)]
    with LLM(path, expert_parallel_size=2, **ENGINE_KW) as llm:
        got = llm.generate(prompts, greedy, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == want
        sampled = llm.generate(prompts, [SamplingParams(temperature=1.0, seed=s, max_tokens=40, structured_outputs=so)
                                         for s in range(8)], use_tqdm=False)
    for o in list(got) + list(sampled):
        obj = json.loads(o.outputs[0].text)
        assert obj["k"] in "abc" and 0 <= obj["v"] <= 99
