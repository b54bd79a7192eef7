"""Images into Qwen3.5-MoE on a GPU (issue 59; docs/multimodal.md): the tiny multimodal checkpoint
(tests/helpers/mm_checkpoints.py) served on CUDA with the Triton kernels, the vision tower on the same device, one
engine for every request: one image and two images give transformers' float64 greedy tokens (CPU), the same image
again hits the prefix cache (under its salt) and gives the same tokens, another image behind the same text misses it,
the same image behind another prefix is answered by the encoder cache, and the cache's counts say so. The CPU form of
each check: tests/engine/test_multimodal_qwen35.py. Run by the GPU plan's `mm` step (benchmarks/gpu_session/mm.sh)."""
from __future__ import annotations

import os

import pytest
import torch

from moelink.engine import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")]

MAX_NEW = 8
# fp32 end to end (the fp32 Triton kernels use IEEE dots, never TF32): transformers' float64 tokens, as the CPU
# engine's float64 tokens are in the CPU tests. Blocks of 8 and state checkpoints: a 16-token image's prompt has
# full blocks to share (the gated-DeltaNet state is restored from a checkpoint at a block edge).
KW = dict(dtype="float32", device="cuda", num_kv_blocks=64, block_size=8, num_state_checkpoints=8)


def test_images_on_cuda_give_transformers_tokens_and_hit_the_caches(tmp_path):
    from tests.helpers.mm_checkpoints import IMAGE, hf_mm_greedy, image, save_mm_checkpoint

    path = save_mm_checkpoint(tmp_path / "qwen35_mm")
    llm = LLM(path, **KW)
    runner = llm.engine.executor.worker.runner
    assert runner.kernels.name == "triton" and runner.device.type == "cuda"
    cache = runner.plugin("images").images.cache
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)

    def run(text, imgs):
        return llm.generate({"prompt": text, "multi_modal_data": {"image": imgs}}, params, use_tqdm=False)[0]

    one = f"describe {IMAGE} now"
    assert run(one, image(1)).outputs[0].token_ids == hf_mm_greedy(path, one, [image(1)], MAX_NEW)
    two, imgs = f"first {IMAGE} then {IMAGE} compare", [image(2, 16, 24), image(3, 32, 16)]
    assert run(two, imgs).outputs[0].token_ids == hf_mm_greedy(path, two, imgs, MAX_NEW)
    assert (cache.misses, cache.hits) == (3, 0)

    text = f"look at {IMAGE} and say"
    a, b = image(4, 32, 32), image(5, 32, 32)  # 16 image tokens each, the same placeholder ids
    first, other, again = run(text, a), run(text, b), run(text, a)
    want_a, want_b = hf_mm_greedy(path, text, [a], MAX_NEW), hf_mm_greedy(path, text, [b], MAX_NEW)
    assert want_a != want_b
    assert first.outputs[0].token_ids == want_a == again.outputs[0].token_ids
    assert other.outputs[0].token_ids == want_b
    assert other.num_cached_tokens == 0 and again.num_cached_tokens > 0  # the image's salt: a miss, then a hit
    assert (cache.misses, cache.hits) == (5, 0)  # the prefix hit covered the image's tokens: nothing encoded
    text2 = f"then {IMAGE} again"  # another prefix, the same image: the encoder cache answers
    assert run(text2, a).outputs[0].token_ids == hf_mm_greedy(path, text2, [a], MAX_NEW)
    assert (cache.misses, cache.hits) == (5, 1) and cache.encode_s > 0
    print(f"encoder on {runner.device}: {cache.misses} images in {cache.encode_s * 1e3:.1f} ms, {cache.hits} hit")
