"""Smoke: tiny MiniMax-M2 and MiMo-V2-Flash on the engine with every kernel forced to Triton (the interpreter on
CPU): MiniMax's all-heads q/k norm (the Triton RMSNorm over the [T, N * H] projection slice) and partial rotary;
MiMo's narrower values through the fused rope + KV write and the paged-attention kernels, its sliding layers'
sinks, window and rope beside the full layers'; same tokens and logprobs as the reference kernels."""
from __future__ import annotations

import random

import pytest
import torch

from moelink.engine import LLM, SamplingParams

from tests.helpers.m2_checkpoints import save_m2_checkpoint

SMALL = {
    "minimax": dict(num_hidden_layers=2),
    "mimo": dict(num_hidden_layers=3, layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                 mlp_layer_types=["dense", "sparse", "sparse"]),
}


def _run(path, kernels, prompts):
    llm = LLM(path, dtype="float32", device="cpu", kernels=kernels, max_num_seqs=4, max_num_batched_tokens=10,
              num_kv_blocks=32, block_size=4, skip_warmup=True)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=5)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMALL))
def test_with_triton_kernels_matches_reference(tmp_path, kdev, name):
    if kdev.type != "cpu":
        pytest.skip("CPU interpreter smoke")
    path = save_m2_checkpoint(tmp_path, name, dtype=torch.float32, **SMALL[name])
    rng = random.Random(0)
    # A decode-only sequence beside a 14-token prompt chunked in two steps (9 + 5), past MiMo's 6-token window.
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (1, 14)]
    want, got = _run(path, "reference", prompts), _run(path, "triton", prompts)
    for (tok_w, lps_w), (tok_g, lps_g) in zip(want, got):
        assert tok_g == tok_w
        for lw, lg in zip(lps_w, lps_g):
            assert lw.keys() == lg.keys()
            assert max(abs(lw[t].logprob - lg[t].logprob) for t in lw) < 1e-4
