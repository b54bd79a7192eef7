"""`load_format="dummy"` under EP 2 on Ray (gloo): each rank makes its own share of the random weights, from
config.json alone (no tokenizer either), and the greedy tokens are those of one rank. gpt-oss MXFP4: its experts
are fused tensors each rank cuts its rows from, the layout where a rank's share is least trivially the same."""
from __future__ import annotations

import json
import random

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.tools.mxfp4_checkpoint import MODULES_NOT_CONVERTED

from tests.helpers.gpt_oss_checkpoints import VOCAB, gpt_oss_config

pytestmark = pytest.mark.slow


def test_ep2_dummy_matches_one_rank(local_ray, tmp_path):
    gpt_oss_config(intermediate_size=32).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_NOT_CONVERTED}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    rng = random.Random(3)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(5)]
    kw = dict(load_format="dummy", dtype="float64", max_num_seqs=4, max_num_batched_tokens=40, num_kv_blocks=64,
              block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, detokenize=False)
    with LLM(str(tmp_path), **kw) as one:
        want = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    with LLM(str(tmp_path), expert_parallel_size=2, **kw) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert len({tuple(t) for t in want}) > 1  # the prompts lead somewhere different: the layers count
