"""Given routing (SamplingParams.forced_routed_experts) under expert parallelism: at EP 2 (CPU ranks on Ray, gloo) the
given logical experts are dispatched to the ranks that hold them, and the prompt logprobs equal transformers' forward
forced to the same routing in float64 (tests/engine/test_routing_replay.py has the one-rank cases)."""
from __future__ import annotations

import numpy as np
import pytest

from moelink.engine import LLM, SamplingParams

from tests.engine.test_routing_replay import _hf_forced_prompt_logprobs, _plp, _recorded
from tests.helpers.parity import prompts

pytestmark = pytest.mark.slow


def test_ep2_runs_the_given_experts(local_ray, tiny_model):
    path = tiny_model("qwen3_e6k3")
    target = prompts(128, seed=75, n=2, lo=30, hi=30)[0]
    llm = LLM(path, dtype="float64", expert_parallel_size=2, max_num_seqs=8, max_num_batched_tokens=24,
              num_kv_blocks=128, block_size=8, enable_return_routed_experts=True)
    try:
        _, routed = _recorded(llm, target)
        given = routed[: len(target)].astype(np.int32)
        given[1::2] = (given[1::2] + 3) % 6  # every other position: experts on the other rank's half too
        out = llm.generate(prompts(128, seed=76, n=3, lo=5, hi=20) + [target], [SamplingParams(max_tokens=2)] * 3 + [
            SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1, forced_routed_experts=given)],
            use_tqdm=False)[-1]
        np.testing.assert_allclose(_plp(out, target), _hf_forced_prompt_logprobs(path, target, given), rtol=0,
                                   atol=1e-5)
    finally:
        llm.shutdown()
