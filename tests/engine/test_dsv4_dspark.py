"""DeepSeek-V4's bundled DSpark stages (engine/models/deepseek_v4/dspark.py, registered for DeepseekV4ForCausalLM in
engine/models/blocks/dspark.DSPARK_STAGES) drafting as speculative method "dspark" with no `model`, on a tiny V4
(tests/helpers/dsv4_dspark_checkpoint.py: a 6-token window, so the stages' context is a window too; three
hyper-connection streams; top-k routed MoE in the stages):
- stages constructed to agree with a target made a bigram: nearly every draft accepted, greedy outputs equal
  decoding without speculation;
- random stages: outputs exact, drafts seldom accepted; `--load-format dummy` runs them too.
"""
from __future__ import annotations

import random

import pytest

from moelink.engine import LLM, SamplingParams

from tests.helpers.dsv4_dspark_checkpoint import save_dsv4_with_dspark

pytestmark = pytest.mark.usefixtures("heap_held_frozen")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return {"agree": save_dsv4_with_dspark(tmp_path_factory.mktemp("agree") / "c", agree=True),
            "random": save_dsv4_with_dspark(tmp_path_factory.mktemp("random") / "c")}


def _generate(path: str, spec=None, **kw) -> tuple[list, object]:
    args = dict(dtype="float32", max_model_len=128, max_num_batched_tokens=32, num_kv_blocks=64, block_size=8,
                enable_prefix_caching=True, speculative_config=spec, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, detokenize=False)
    rng = random.Random(0)
    with LLM(path, **args) as llm:
        vocab = llm.engine.config.model.vocab_size
        prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 20))] for _ in range(6)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.engine.stats()


SPEC = {"method": "dspark", "num_speculative_tokens": 3}  # the tiny V4's smallest ring: 4 slots


@pytest.mark.slow
def test_agreeing_v4_stages_are_accepted_and_outputs_exact(ckpts):
    got, stats = _generate(ckpts["agree"], SPEC)
    assert got == _generate(ckpts["agree"])[0]
    sd = stats.spec_decode
    print(f"V4 DSpark, agreeing stages: acceptance rate {sd.acceptance_rate:.3f}")
    assert sd.acceptance_rate > 0.9, sd


@pytest.mark.slow
def test_random_v4_stages_keep_outputs_exact(ckpts):
    got, stats = _generate(ckpts["random"], SPEC)
    assert got == _generate(ckpts["random"])[0]
    sd = stats.spec_decode
    print(f"V4 DSpark, random stages: acceptance rate {sd.acceptance_rate:.3f}")
    assert sd.num_verify_rows > 10 and sd.acceptance_rate < 0.5, sd


def test_dummy_v4_stages_load_and_draft(ckpts):
    got, stats = _generate(ckpts["random"], SPEC, load_format="dummy")
    assert len(got) == 6 and stats.spec_decode.num_draft_tokens > 0
