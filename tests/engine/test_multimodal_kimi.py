"""Images into Kimi K2.5 (issue 59; docs/multimodal.md): a tiny random Kimi_K25ForConditionalGeneration written by
transformers (MoonViT and its projector beside a DeepSeek-V3 MLA text model), against transformers' generate in
float64. Kimi_K25ImageProcessor needs torchvision, which is not installable here: the images come in as the
processor's outputs with token ids (vLLM's and smg's preprocessed form), and PIL images are refused naming the field;
where torchvision is installed, the PIL test runs the checkpoint's own processor."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams
from tests.helpers.mm_checkpoints import (KIMI_IMAGE, has_torchvision, hf_kimi_greedy, image, kimi_ids,
                                          kimi_pixels, save_kimi_checkpoint)

MAX_NEW = 6


@pytest.fixture(scope="module")
def kimi_path(tmp_path_factory):
    return save_kimi_checkpoint(tmp_path_factory.mktemp("kimi_k25_mm"))


def _prompt(path: str, text: str, pixels: dict) -> dict:
    return {"prompt_token_ids": kimi_ids(path, text, pixels["image_grid_thw"]), "multi_modal_data": {"image": pixels}}


def _greedy(llm, prompt):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.slow
def test_one_and_two_images_give_transformers_tokens(kimi_path):
    llm = LLM(kimi_path, dtype="float64", num_kv_blocks=64, block_size=16)
    assert llm.engine.executor.worker.runner.plugin("images") is not None
    for text, grids in [(f"describe {KIMI_IMAGE} now", [(1, 4, 6)]),
                        (f"first {KIMI_IMAGE} then {KIMI_IMAGE} compare", [(2, 4, 6), (3, 6, 4)])]:
        pixels = kimi_pixels(grids)
        prompt = _prompt(kimi_path, text, pixels)
        want = hf_kimi_greedy(kimi_path, prompt["prompt_token_ids"], pixels, MAX_NEW)
        assert _greedy(llm, prompt) == want
        # the image matters: the same ids without it (placeholder embeddings) give other tokens
        assert want != hf_kimi_greedy(kimi_path, prompt["prompt_token_ids"], None, MAX_NEW)


@pytest.mark.slow
def test_a_different_image_misses_the_prefix_cache_and_the_same_image_hits(kimi_path):
    text = f"look at {KIMI_IMAGE} and say"
    a, b = kimi_pixels([(4, 8, 8)]), kimi_pixels([(5, 8, 8)])  # 16 image tokens each
    llm = LLM(kimi_path, dtype="float64", num_kv_blocks=64, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)

    def run(px):
        return llm.generate(_prompt(kimi_path, text, px), params, use_tqdm=False)[0]

    first, other, again = run(a), run(b), run(a)
    ids = kimi_ids(kimi_path, text, a["image_grid_thw"])
    want_a, want_b = hf_kimi_greedy(kimi_path, ids, a, MAX_NEW), hf_kimi_greedy(kimi_path, ids, b, MAX_NEW)
    assert want_a != want_b
    assert first.outputs[0].token_ids == want_a == again.outputs[0].token_ids
    assert other.outputs[0].token_ids == want_b
    assert other.num_cached_tokens == 0 and again.num_cached_tokens > 0
    cache = llm.engine.executor.worker.runner.plugin("images").images.cache
    assert (cache.misses, cache.hits) == (2, 0)  # the prefix hit covered the image tokens: nothing to encode


@pytest.mark.slow
def test_chunks_cut_inside_the_image_and_a_text_request_beside_it(kimi_path):
    """A step budget of 5 tokens: the image's 16 placeholder tokens span four chunks, batched with a text-only
    request; a pool of 4 blocks of 8 preempts, and the resumed request gets its image rows again."""
    pixels = kimi_pixels([(6, 8, 8)])
    prompt = _prompt(kimi_path, f"a {KIMI_IMAGE} b", pixels)
    plain = kimi_ids(kimi_path, "hello there world", pixels["image_grid_thw"][:0])
    llm = LLM(kimi_path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=5, num_kv_blocks=4, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": plain}, prompt], params, use_tqdm=False)
    assert outs[1].outputs[0].token_ids == hf_kimi_greedy(kimi_path, prompt["prompt_token_ids"], pixels, MAX_NEW)
    assert outs[0].outputs[0].token_ids == hf_kimi_greedy(kimi_path, plain, None, MAX_NEW)
    stats = llm.engine.stats()
    assert stats.num_preemptions_total > 0 and stats.num_free_blocks == stats.num_total_blocks


@pytest.mark.slow
def test_pil_images_without_torchvision_are_refused_naming_the_field(kimi_path):
    if has_torchvision():
        pytest.skip("torchvision is installed: the processor runs (test_pil_images_through_the_processor)")
    llm = LLM(kimi_path, dtype="float64", num_kv_blocks=32, block_size=16)
    with pytest.raises(ValueError, match=r"prompt\['multi_modal_data'\]\['image'\] as PIL images.*torchvision"):
        llm.generate({"prompt": f"x {KIMI_IMAGE}", "multi_modal_data": {"image": image(1)}}, use_tqdm=False)
    pixels = kimi_pixels([(1, 4, 6)])
    ids = kimi_ids(kimi_path, f"x {KIMI_IMAGE}", pixels["image_grid_thw"])
    flat = {"pixel_values": pixels["pixel_values"].reshape(24, -1), "image_grid_thw": pixels["image_grid_thw"]}
    with pytest.raises(ValueError, match=r"\['pixel_values'\] has shape \(24, 48\).*\[patches, 3, 4, 4\]"):
        llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": flat}}, use_tqdm=False)
    # Kimi K2.5's video is not built: refused naming the field, and a limit that would promise it at start.
    video = {"pixel_values_videos": pixels["pixel_values"], "video_grid_thw": pixels["image_grid_thw"]}
    with pytest.raises(ValueError, match=r"\['video'\] is not supported: this checkpoint's video path"):
        llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"video": video}}, use_tqdm=False)
    from moelink.engine.config.multimodal import MultimodalConfig
    from moelink.engine.multimodal.processor import ImageProcessor

    with pytest.raises(ValueError, match=r"limit_mm_per_prompt\['video'\]=1 is not supported for Kimi"):
        ImageProcessor(kimi_path, MultimodalConfig(limit_mm_per_prompt={"video": 1}))
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and not llm.engine.has_unfinished_requests()


@pytest.mark.slow
@pytest.mark.skipif(not has_torchvision(), reason="Kimi_K25ImageProcessor needs torchvision (not installable here)")
def test_pil_images_through_the_processor(kimi_path):
    """vLLM's form, {"prompt": ..., "multi_modal_data": {"image": pil}}: the checkpoint's processor, then
    transformers' tokens on the processor's own outputs."""
    from transformers import AutoProcessor

    text, imgs = f"see {KIMI_IMAGE} and {KIMI_IMAGE}", [image(1, 16, 24), image(2, 24, 16)]
    out = AutoProcessor.from_pretrained(kimi_path)(text=[text], images=imgs, return_tensors="pt")
    want = hf_kimi_greedy(kimi_path, out["input_ids"][0].tolist(),
                          {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}, MAX_NEW)
    llm = LLM(kimi_path, dtype="float64", num_kv_blocks=64, block_size=16)
    assert _greedy(llm, {"prompt": text, "multi_modal_data": {"image": imgs}}) == want


@pytest.mark.slow
def test_grpc_mm_inputs_in_kimis_pixel_layout_give_transformers_tokens(kimi_path):
    """VllmEngine.Generate with mm_inputs (smg's MultimodalInputs) carrying Kimi's [patches, 3, patch, patch] pixel
    values: transformers' tokens; GetModelInfo says the engine takes images, as the checkpoint is published."""
    import grpc
    import numpy as np

    from tests.helpers.grpc_server import ThreadServer, make_stubs

    pixels = kimi_pixels([(9, 8, 8)])
    ids = kimi_ids(kimi_path, f"see {KIMI_IMAGE} here", pixels["image_grid_thw"])
    srv = ThreadServer(kimi_path, dict(dtype="float64", num_kv_blocks=64, block_size=16))
    try:
        stubs = make_stubs(grpc.insecure_channel(srv.addr))
        vpb = stubs.vpb
        info = stubs.vllm.GetModelInfo(vpb.GetModelInfoRequest())
        assert info.supports_vision and info.model_type == "kimi_k25"
        assert list(info.architectures) == ["Kimi_K25ForConditionalGeneration"]
        pix = pixels["pixel_values"].numpy().astype(np.float32)
        grid = pixels["image_grid_thw"].numpy().astype(np.int64)
        mm = vpb.MultimodalInputs(
            pixel_values=vpb.TensorData(shape=list(pix.shape), dtype="float32", inline=pix.tobytes()),
            model_specific_tensors={"image_grid_thw": vpb.TensorData(shape=list(grid.shape), dtype="int64",
                                                                     inline=grid.tobytes())})
        req = vpb.GenerateRequest(
            request_id="k-1", tokenized=vpb.TokenizedInput(input_ids=ids), mm_inputs=mm, stream=False,
            sampling_params=vpb.SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
        msgs = list(stubs.vllm.Generate(req))
        assert list(msgs[-1].complete.output_ids) == hf_kimi_greedy(kimi_path, ids, pixels, MAX_NEW)
    finally:
        srv.close()


def test_vision_specs_are_validated_and_kimi_takes_images_only_with_its_processor_config(tmp_path):
    import json

    from moelink.engine.multimodal.spec import VISION_SPECS, VisionModule, VisionSpec, multimodal_architecture

    with pytest.raises(ValueError, match="positions must be"):
        VisionSpec("M", (VisionModule("v", "AutoModel", "vision_config", "model.v."),), positions="3d",
                   merge_field="m", pixels="flat")
    with pytest.raises(ValueError, match="prefix must end"):
        VisionModule("v", "AutoModel", "vision_config", "model.v")
    assert VISION_SPECS["Kimi_K25ForConditionalGeneration"].positions == "1d"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Kimi_K25ForConditionalGeneration"]}))
    assert multimodal_architecture(str(tmp_path)) is None  # no image processor config: served as its text model
    (tmp_path / "preprocessor_config.json").write_text("{}")
    assert multimodal_architecture(str(tmp_path)) == "Kimi_K25ForConditionalGeneration"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["KimiK25ForConditionalGeneration"]}))
    assert multimodal_architecture(str(tmp_path)) is None  # the published layout: its text model


class _StandInProcessor:
    """Kimi_K25Processor's interface (image_token, __call__ to ids, pixel_values and grids) over fixed outputs, for
    the PIL path where the real one cannot be built (torchvision): its ids are kimi_ids', its pixels kimi_pixels'."""

    image_token, image_token_id = "<|media_pad|>", None

    def __init__(self, path: str, pixels: dict):
        self.path, self.pixels, self.calls = path, pixels, 0

    def __call__(self, text, images, return_tensors):
        import torch

        assert len(images) == len(self.pixels["image_grid_thw"]) and return_tensors == "pt"
        self.calls += 1
        ids = kimi_ids(self.path, text[0], self.pixels["image_grid_thw"])
        return {"input_ids": torch.tensor([ids]), **self.pixels}


@pytest.mark.slow
def test_the_pil_path_with_the_processors_outputs_gives_transformers_tokens(kimi_path, monkeypatch):
    """The PIL path past the processor (ids and pixels from it, 1-D positions, no rope index): transformers' tokens.
    The processor is a stand-in returning fixed outputs, since Kimi_K25ImageProcessor needs torchvision."""
    text, pixels = f"see {KIMI_IMAGE} and {KIMI_IMAGE}", kimi_pixels([(21, 4, 6), (22, 6, 4)])
    llm = LLM(kimi_path, dtype="float64", num_kv_blocks=64, block_size=16)
    stand_in = _StandInProcessor(kimi_path, pixels)
    monkeypatch.setattr(llm.engine.multimodal, "processor", stand_in)
    got = _greedy(llm, {"prompt": text, "multi_modal_data": {"image": [image(1), image(2)]}})
    assert stand_in.calls == 1
    assert got == hf_kimi_greedy(kimi_path, kimi_ids(kimi_path, text, pixels["image_grid_thw"]), pixels, MAX_NEW)


@pytest.mark.slow
@pytest.mark.parametrize("p_right", [0.9, 0.0])
def test_speculative_decoding_with_an_image_gives_transformers_tokens(kimi_path, p_right):
    """A host drafter right with probability 0.9, and never, behind an image prompt: transformers' tokens."""
    import functools

    from moelink.benchmarks.spec_decode import OracleDrafter

    pixels = kimi_pixels([(31, 8, 8)])
    prompt = _prompt(kimi_path, f"spec {KIMI_IMAGE} test", pixels)
    want = hf_kimi_greedy(kimi_path, prompt["prompt_token_ids"], pixels, MAX_NEW)
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, {tuple(prompt["prompt_token_ids"]): want}, p_right,
                                                 vocab=404, seed=4)}
    llm = LLM(kimi_path, dtype="float64", num_kv_blocks=64, block_size=8, speculative_config=spec)
    assert _greedy(llm, prompt) == want
    sd = llm.engine.stats().spec_decode
    assert sd is not None and sd.num_draft_tokens > 0 and (sd.num_accepted_tokens > 0) == (p_right > 0)


def test_each_multimodal_family_registers_its_vision_spec_from_its_own_package():
    """The wrappers' VisionSpecs come from the families' vision.py (engine/models/<family>/), gathered at the first
    lookup; the registry refuses a second spec for one wrapper and anything but a VisionSpec."""
    import sys

    from moelink.engine.multimodal.spec import VISION_SPECS, VisionModule, VisionRegistry, VisionSpec

    assert sorted(VISION_SPECS) == ["Kimi_K25ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"]
    assert "moelink.engine.models.deepseek.vision" in sys.modules
    assert "moelink.engine.models.qwen3_next.vision" in sys.modules
    spec = VisionSpec("M", (VisionModule("v", "AutoModel", "vision_config", "model.v."),), positions="1d",
                      merge_field="m", pixels="chw")
    registry = VisionRegistry()
    registry.add("M", spec)
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("M", spec)
    with pytest.raises(TypeError, match="VisionSpec"):
        registry.add("N", object())  # type: ignore[arg-type]
