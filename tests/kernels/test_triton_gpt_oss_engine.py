"""Smoke: a tiny gpt-oss on the engine with every kernel forced to Triton (the interpreter on CPU): sinks and
sliding windows in the paged-attention kernels (decode, chunked prefill past the window), the biased experts
through the Triton strategy's reference fallback; same tokens and logprobs as the reference kernels."""
from __future__ import annotations

import random

import pytest

from moelink.engine import LLM, SamplingParams

from tests.helpers.gpt_oss_checkpoints import save_gpt_oss


def _run(path, kernels, prompts):
    llm = LLM(path, dtype="float32", device="cpu", kernels=kernels, max_num_seqs=4, max_num_batched_tokens=10,
              num_kv_blocks=32, block_size=4, skip_warmup=True)  # warm-up: test_triton_warmup.py
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=5)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.slow
def test_gpt_oss_with_triton_kernels_matches_reference(tmp_path, kdev):
    if kdev.type != "cpu":
        pytest.skip("CPU interpreter smoke")
    path = save_gpt_oss(tmp_path, num_hidden_layers=2)  # one sliding layer, one full: the interpreter is slow
    rng = random.Random(0)
    # A decode-only sequence beside a 14-token prompt chunked in two steps (9 + 5) past the 6-token window.
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (1, 14)]
    want, got = _run(path, "reference", prompts), _run(path, "triton", prompts)
    for (tok_w, lps_w), (tok_g, lps_g) in zip(want, got):
        assert tok_g == tok_w
        for lw, lg in zip(lps_w, lps_g):
            assert lw.keys() == lg.keys()
            assert max(abs(lw[t].logprob - lg[t].logprob) for t in lw) < 1e-4
