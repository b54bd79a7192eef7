"""Smoke: a tiny MiMo-V2-Flash on the engine with every kernel forced to Triton (the interpreter on CPU): its
narrower values through the fused rope + KV write and the paged-attention kernels, its sliding layers' sinks,
window and rope beside the full layers'; same tokens and logprobs as the reference kernels. MiniMax-M2 adds one
Triton call of its own to what other families run, the RMSNorm of the whole [T, N * H] q (and [T, K * H] k) slice
of the qkv projection: checked alone against the reference."""
from __future__ import annotations

import random

import pytest
import torch

from moelink.engine import LLM, SamplingParams

from tests.helpers.m2_checkpoints import save_m2_checkpoint

SMALL = {
    "mimo": dict(num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"],
                 mlp_layer_types=["dense", "sparse"]),
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


def test_all_heads_norm_on_a_projection_slice(gen, kdev):
    """MiniMax-M2's q / k norm: one RMSNorm over a token's N * H (K * H) dims, of a column slice of the qkv
    projection's output (strided rows), as the model passes it."""
    from moelink.kernels.norm import reference_rms_norm
    from moelink.kernels.triton_norm import triton_rms_norm

    T, N, K, H = 5, 4, 2, 16
    qkv = torch.randn(T, (N + 2 * K) * H, generator=gen)
    w = 1 + 0.2 * torch.randn(N * H, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        x = qkv.to(dtype)
        for sl, width in ((slice(0, N * H), N * H), (slice(N * H, (N + K) * H), K * H)):
            got = triton_rms_norm(x[:, sl].to(kdev), w[:width].to(dtype).to(kdev), 1e-6)
            # torch's default tolerances: the fp32 sum of squares may associate differently (an ulp)
            torch.testing.assert_close(got.cpu(), reference_rms_norm(x[:, sl], w[:width].to(dtype), 1e-6))
