"""Smoke: a tiny MiniMax-M3 (its multimodal checkpoint, engine/models/minimax_m3/tiny.py) on the engine with every
kernel forced to Triton (the interpreter on CPU): block-sparse attention's kernel beside GQA's on the full layers, a
22-token prompt chunked over steps (so the indexer drops blocks of 4 and reads index keys of earlier chunks) beside a
decode-only sequence; same tokens and logprobs as the reference kernels."""
from __future__ import annotations

import random

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.models.minimax_m3.tiny import MINIMAX_M3

from tests.helpers.drawn_presets import save_preset


def _run(path, kernels, prompts):
    llm = LLM(path, dtype="float32", device="cpu", kernels=kernels, max_num_seqs=4, max_num_batched_tokens=10,
              num_kv_blocks=32, block_size=4, skip_warmup=True)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=5)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.slow
def test_with_triton_kernels_matches_reference(tmp_path, kdev):
    if kdev.type != "cpu":
        pytest.skip("CPU interpreter smoke")
    path = save_preset(tmp_path, MINIMAX_M3, num_hidden_layers=2, layer_types=["full_attention", "minimax_m3_sparse"],
                       mlp_layer_types=["dense", "sparse"], dtype=torch.float32)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (1, 22)]
    want, got = _run(path, "reference", prompts), _run(path, "triton", prompts)
    for (tok_w, lps_w), (tok_g, lps_g) in zip(want, got):
        assert tok_g == tok_w
        for lw, lg in zip(lps_w, lps_g):
            assert lw.keys() == lg.keys()
            assert max(abs(lw[t].logprob - lg[t].logprob) for t in lw) < 1e-4
