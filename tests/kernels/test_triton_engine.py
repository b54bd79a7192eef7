"""Smoke: the engine on CPU with every kernel forced to Triton (interpreter) matches the reference kernels."""
from __future__ import annotations

import random

import pytest

from moelink.engine import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


def _run(path, kernels, prompts, kv_cache_dtype="auto", **kw):
    llm = LLM(path, dtype="float32", device="cpu", kernels=kernels, max_num_seqs=4, max_num_batched_tokens=16,
              num_kv_blocks=32, block_size=16, kv_cache_dtype=kv_cache_dtype, skip_warmup=True, **kw)  # warm-up: test_triton_warmup.py
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, logprobs=5)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.slow
# GQA; MLA (latent cache, MLA kernel); MLA over an fp8 latent cache, whose chunked prompt reads its context
# widened once per chunk (kernels/triton_mla_wide.py) beside the decodes reading the fp8 cache.
# DeepSeek Sparse Attention (index_topk 8 / 12: the 17-token prompt selects, and the 9-token one at 8): the indexer's
# Triton selection and sparse MLA, GLM-5's shared layer, over an fp8 cache too.
@pytest.mark.parametrize("name,kv", [("qwen3_e6k3", "auto"), ("dsv3_neox", "auto"), ("dsv3_neox", "fp8"),
                                     ("dsv32", "auto"), ("glm5", "fp8")])
def test_engine_with_triton_kernels_matches_reference(tiny_model, hf_tiny_model, kdev, name, kv):
    if kdev.type != "cpu":
        pytest.skip("CPU interpreter smoke; with a GPU, tests/engine/test_gpu_engine.py runs the engine on Triton")
    path = tiny_model(name) if name.startswith("qwen3") else hf_tiny_model(name)
    rng = random.Random(0)
    # A decode-only sequence, a chunked prompt over a 16-token block edge (17 > 16 tokens per step), and a short one
    # (no longer: the interpreter's cost grows with the tokens of a step). Two tokens each: the 1-token prompt's
    # decode rides beside the second step's chunks, and the third step decodes the other two alone.
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (1, 17, 9)]
    # DSA decode steps score max_model_len positions wide (graph-safe): keep it near the prompts for the interpreter.
    kw = dict(max_model_len=32) if name in ("dsv32", "glm5") else {}
    want, got = _run(path, "reference", prompts, kv, **kw), _run(path, "triton", prompts, kv, **kw)
    for (tok_w, lps_w), (tok_g, lps_g) in zip(want, got):
        assert tok_g == tok_w
        for lw, lg in zip(lps_w, lps_g):
            assert lw.keys() == lg.keys()
            assert max(abs(lw[t].logprob - lg[t].logprob) for t in lw) < 1e-4


@pytest.mark.slow  # over 1 s (interpreter, 2026-11-26: ~8 s)
def test_engine_on_the_batch_invariant_triton_backend_gives_a_request_the_same_logprobs_alone_and_batched(tiny_model,
                                                                                                          kdev):
    """The backend a GPU's batch-invariant mode runs (kernels/batch_invariant_triton.py), forced here on CPU: its
    attention, fused MoE and RMSNorm, and every linear through its step context's fixed-tile matmul, all in the
    interpreter. A request alone and among three others (a chunked 17-token prompt beside it) gets bitwise the same
    logprobs, which are the reference kernels' within float32 noise. (The normal Triton backend's differ in their
    last bits here: measured 2026-11-26, -0.6514157652854919 alone and -0.6514157056808472 batched.)"""
    if kdev.type != "cpu":
        pytest.skip("CPU interpreter smoke; with a GPU the `rl` step (benchmarks/batch_invariant.py) runs the engine on "
                    "this backend, alone and batched")
    path = tiny_model("qwen3_e6k3")
    rng = random.Random(0)
    target = [rng.randrange(3, 400) for _ in range(9)]
    others = [[rng.randrange(3, 400) for _ in range(n)] for n in (1, 17, 5)]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=0)

    def logprobs(out):
        return [lp[t].logprob for t, lp in zip(out.outputs[0].token_ids, out.outputs[0].logprobs)]

    def run(kernels):
        llm = LLM(path, dtype="float32", device="cpu", kernels=kernels, max_num_seqs=4, max_num_batched_tokens=16,
                  num_kv_blocks=32, block_size=16, skip_warmup=True)
        try:
            alone = logprobs(llm.generate([target], params, use_tqdm=False)[0])
            llm.flush_cache()
            batched = logprobs(llm.generate(others[:2] + [target] + others[2:], params, use_tqdm=False)[2])
            return alone, batched
        finally:
            llm.shutdown()

    alone, batched = run("batch_invariant_triton")
    assert alone == batched
    want, _ = run("reference")
    assert max(abs(a - b) for a, b in zip(alone, want)) < 1e-4
