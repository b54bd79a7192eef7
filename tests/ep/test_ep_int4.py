"""INT4 experts (issue 44) under EP 2 on Ray (gloo): tiny DeepSeek-V3 (Kimi K2 / K2.5-shaped, symmetric group 32, as
Kimi ships it) and Qwen3-MoE (zero points) checkpoints quantized by compressed-tensors' own compressor give
transformers' greedy tokens, each rank reading its experts only. The DeepSeek-V3 run adds two redundant replicas and
online EPLB, which moves INT4 experts (int32 words, scales, zero points: every tensor per slot) between the ranks
while serving."""
from __future__ import annotations

import random

import pytest
import torch

from moelink.engine import LLM, SamplingParams

from tests.helpers.fp8_checkpoints import hf_greedy_with
from tests.helpers.int4_checkpoints import decompressed_copy, int4_checkpoint, save_tiny
from tests.helpers.nvfp4_checkpoints import VOCAB

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name,symmetric,eplb", [("dsv3", True, True), ("qwen3", False, False)])
def test_ep2_int4_matches_transformers(local_ray, tmp_path, name, symmetric, eplb):
    from transformers import AutoModelForCausalLM

    dst = int4_checkpoint(save_tiny(tmp_path / "float", name), tmp_path / "int4", symmetric, 32, "experts")
    rng = random.Random(11)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(4)]
    kw = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=40, num_kv_blocks=64, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    oracle = dst if symmetric else decompressed_copy(dst, tmp_path / "deq")  # (test_int4_checkpoint.py: why)
    hf = AutoModelForCausalLM.from_pretrained(oracle, dtype=torch.float64, experts_implementation="eager")
    want = hf_greedy_with(hf.to(torch.float64).eval(), prompts, 5)
    extra = dict(num_redundant_experts=2, eplb_interval=2) if eplb else {}
    llm = LLM(dst, expert_parallel_size=2, **extra, **kw)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
        if eplb:  # INT4 experts moved mid-stream; the tokens above stayed transformers'
            m = llm.engine.expert_load().eplb
            assert m["rebalances"] >= 1 and m["bytes_moved"] > 0
    finally:
        llm.engine.shutdown()
