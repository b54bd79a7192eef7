"""Images into Qwen3.5-MoE and Kimi K2.5 across ranks (issue 59, docs/multimodal.md): at EP 2 (Ray, CPU ranks, gloo,
float64; each rank its own requests, so each encodes its own requests' images: the tower data-parallel over images)
and at TP 2 (every rank of the group encodes the group's images, its heads rotated by the same positions), two
image requests (one of two images) beside a text one give transformers' greedy tokens, and the pools are free
after. Two-batch overlap is on: a step's image rows and 3-D positions split with its micro-batches
(contract/forward_inputs.ImageSplice.select). Lean: one engine per (checkpoint, layout), 3 prompts, 4 new tokens each; each
checkpoint and transformers' tokens on it made once for the module."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

NEW = 4
LAYOUTS = [dict(expert_parallel_size=2, enable_two_batch_overlap=True),
           dict(tensor_parallel_size=2, enable_two_batch_overlap=True)]


@pytest.fixture(scope="module")
def qwen_case(tmp_path_factory):
    """(checkpoint, prompts in vLLM's form, transformers' tokens for each)."""
    from tests.helpers.mm_checkpoints import IMAGE, hf_mm_greedy, image, save_mm_checkpoint

    path = save_mm_checkpoint(tmp_path_factory.mktemp("qwen35_mm"))
    reqs = [(f"one {IMAGE} two", [image(1, 32, 32)]), ("plain text here", []),
            (f"a {IMAGE} b {IMAGE} c", [image(2, 16, 24), image(3, 24, 16)])]
    want = [hf_mm_greedy(path, text, imgs, NEW) for text, imgs in reqs]
    return path, [{"prompt": t, "multi_modal_data": {"image": i}} if i else t for t, i in reqs], want


@pytest.fixture(scope="module")
def kimi_case(tmp_path_factory):
    """Kimi K2.5 (MoonViT beside DeepSeek-V3 MLA, 1-D positions): the processor's outputs with token ids (its image
    processor needs torchvision, not installable here), and transformers' tokens for each."""
    from tests.helpers.mm_checkpoints import KIMI_IMAGE, hf_kimi_greedy, kimi_ids, kimi_pixels, save_kimi_checkpoint

    path = save_kimi_checkpoint(tmp_path_factory.mktemp("kimi_k25_mm"))
    one, two = kimi_pixels([(1, 8, 8)]), kimi_pixels([(2, 4, 6), (3, 6, 4)])
    prompts = [{"prompt_token_ids": kimi_ids(path, f"one {KIMI_IMAGE} two", one["image_grid_thw"]),
                "multi_modal_data": {"image": one}},
               {"prompt_token_ids": kimi_ids(path, "plain text here", one["image_grid_thw"][:0])},
               {"prompt_token_ids": kimi_ids(path, f"a {KIMI_IMAGE} b {KIMI_IMAGE} c", two["image_grid_thw"]),
                "multi_modal_data": {"image": two}}]
    want = [hf_kimi_greedy(path, p["prompt_token_ids"], p.get("multi_modal_data", {}).get("image"), NEW)
            for p in prompts]
    return path, prompts, want


def _check_layout(case, layout: dict) -> None:
    path, prompts, want = case
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=16, num_kv_blocks=64, block_size=4,
              **layout)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("layout", LAYOUTS, ids=["ep2", "tp2"])
def test_qwen35_image_requests_across_ranks_give_transformers_tokens(local_ray, qwen_case, layout):
    _check_layout(qwen_case, layout)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["ep2", "tp2"])
def test_kimi_image_requests_across_ranks_give_transformers_tokens(local_ray, kimi_case, layout):
    """Kimi K2.5 at EP 2 (each rank encodes its own requests' images) and TP 2 (MLA: the latent whole on every
    rank, the query heads split; every rank encodes the group's images)."""
    _check_layout(kimi_case, layout)
