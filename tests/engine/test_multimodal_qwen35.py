"""Images into Qwen3.5-MoE (issue 59; docs/multimodal.md): refusals where a model cannot take them, then a tiny
random multimodal checkpoint written by transformers, its processor beside it, against transformers'
Qwen3_5MoeForConditionalGeneration.generate in float64."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def text_llm(hf_tiny_model):
    return LLM(hf_tiny_model("qwen3_next"), dtype="float64", num_kv_blocks=32, block_size=16)


@pytest.mark.slow
@pytest.mark.parametrize("prompt, field", [
    ({"prompt": "hello", "multi_modal_data": {"image": object()}}, "prompt['multi_modal_data']"),
    ({"prompt_token_ids": [1, 2], "multi_modal_data": {}}, "prompt['multi_modal_data']"),
    ({"prompt": "hello", "mm_processor_kwargs": {}}, "prompt['mm_processor_kwargs']"),
    ({"prompt": "hello", "cache_salt": "x"}, "prompt['cache_salt']"),
])
def test_a_field_a_text_model_cannot_use_is_refused_naming_it(text_llm, prompt, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        text_llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)
    assert text_llm.generate({"prompt": "hello"}, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs
    # multi_modal_data None is no images, as vLLM reads it
    assert text_llm.generate({"prompt": "hello", "multi_modal_data": None}, SamplingParams(max_tokens=2),
                             use_tqdm=False)[0].outputs


# -- a tiny Qwen3.5-MoE multimodal checkpoint against transformers -------------------------------------------------
MAX_NEW = 8


@pytest.fixture(scope="module")
def mm_path(tmp_path_factory):
    from tests.helpers.mm_checkpoints import save_mm_checkpoint

    return save_mm_checkpoint(tmp_path_factory.mktemp("qwen35_mm"))


def _greedy(llm, prompt):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.slow
def test_one_image_gives_transformers_tokens(mm_path):
    from tests.helpers.mm_checkpoints import IMAGE, hf_mm_greedy, image

    text = f"describe {IMAGE} now"
    llm = LLM(mm_path, dtype="float64", num_kv_blocks=64, block_size=16)
    got = _greedy(llm, {"prompt": text, "multi_modal_data": {"image": image(1)}})
    assert got == hf_mm_greedy(mm_path, text, [image(1)], MAX_NEW)


@pytest.mark.slow
def test_two_images_give_transformers_tokens(mm_path):
    from tests.helpers.mm_checkpoints import IMAGE, hf_mm_greedy, image

    text = f"first {IMAGE} then {IMAGE} compare"
    imgs = [image(2, 16, 24), image(3, 32, 16)]
    llm = LLM(mm_path, dtype="float64", num_kv_blocks=64, block_size=16)
    assert _greedy(llm, {"prompt": text, "multi_modal_data": {"image": imgs}}) == hf_mm_greedy(
        mm_path, text, imgs, MAX_NEW)


@pytest.mark.slow
def test_a_different_image_misses_the_prefix_cache_and_the_same_image_hits(mm_path):
    """Same text, same placeholder tokens: a different image gives other tokens (as transformers' do) and shares no
    KV; the same image again reuses its prompt's KV and gives the same tokens. Its encoder output is cached too."""
    from tests.helpers.mm_checkpoints import IMAGE, hf_mm_greedy, image

    text = f"look at {IMAGE} and say"
    a, b = image(4, 32, 32), image(5, 32, 32)  # 16 image tokens each
    llm = LLM(mm_path, dtype="float64", num_kv_blocks=64, block_size=8, num_state_checkpoints=8)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)

    def run(img):
        return llm.generate({"prompt": text, "multi_modal_data": {"image": img}}, params, use_tqdm=False)[0]

    first, other, again = run(a), run(b), run(a)
    want_a, want_b = hf_mm_greedy(mm_path, text, [a], MAX_NEW), hf_mm_greedy(mm_path, text, [b], MAX_NEW)
    assert want_a != want_b
    assert first.outputs[0].token_ids == want_a and again.outputs[0].token_ids == want_a
    assert other.outputs[0].token_ids == want_b
    assert other.num_cached_tokens == 0 and again.num_cached_tokens > 0
    cache = llm.engine.executor.worker.runner.plugin("images").images.cache
    assert (cache.misses, cache.hits) == (2, 0)  # the prefix hit covered the image tokens: nothing to encode
    text2 = f"then {IMAGE} again"  # another prefix, the same image: the encoder's cache answers
    got = llm.generate({"prompt": text2, "multi_modal_data": {"image": a}}, params, use_tqdm=False)[0]
    assert got.outputs[0].token_ids == hf_mm_greedy(mm_path, text2, [a], MAX_NEW)
    assert (cache.misses, cache.hits) == (2, 1)
    from moelink.engine.core.metrics import multimodal_families

    m = {f.name: f.samples[0].value for f in multimodal_families(llm.engine.mm_stats)}
    assert m == {"moelink_mm_requests": 4, "moelink_mm_images": 4, "moelink_mm_videos": 0,
                 "moelink_mm_encoder_images": 2, "moelink_mm_encoder_cache_hits": 1,
                 "moelink_mm_encoder_seconds": pytest.approx(cache.encode_s)}


@pytest.mark.slow
def test_chunks_cut_inside_the_image_and_a_text_request_beside_it(mm_path):
    """A step budget of 5 tokens: the image's 16 placeholder tokens span four chunks, batched with a text-only
    request; a pool of 4 blocks of 8 preempts, and the resumed request recomputes its image rows and positions."""
    from tests.helpers.mm_checkpoints import IMAGE, hf_mm_greedy, image

    mm_text, plain = f"a {IMAGE} b", "hello there world"
    img = image(6, 32, 32)
    llm = LLM(mm_path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=5, num_kv_blocks=4, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    # The later request is the one preempted: the image one.
    outs = llm.generate([plain, {"prompt": mm_text, "multi_modal_data": {"image": img}}], params, use_tqdm=False)
    assert outs[1].outputs[0].token_ids == hf_mm_greedy(mm_path, mm_text, [img], MAX_NEW)
    assert outs[0].outputs[0].token_ids == hf_mm_greedy(mm_path, plain, [], MAX_NEW)
    assert llm.engine.stats().num_preemptions_total > 0
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


@pytest.mark.slow
def test_bad_images_are_refused_naming_the_field_and_hold_nothing(mm_path):
    import torch

    from tests.helpers.mm_checkpoints import IMAGE, image

    llm = LLM(mm_path, dtype="float64", num_kv_blocks=32, block_size=16, limit_mm_per_prompt={"image": 1},
              mm_max_pixels=500)
    params = SamplingParams(max_tokens=2)
    bad = [
        ({"prompt": f"{IMAGE}{IMAGE}", "multi_modal_data": {"image": [image(1), image(2)]}},
         r"limit_mm_per_prompt\['image'\]=1"),
        ({"prompt": IMAGE, "multi_modal_data": {"image": image(1, 32, 32)}}, r"\['image'\]\[0\] is 32x32.*max_pixels=500"),
        ({"prompt": IMAGE, "multi_modal_data": {"image": "x.png"}}, r"\['image'\]\[0\] of type str"),
        ({"prompt": IMAGE, "multi_modal_data": {"image": []}}, r"\['image'\] is empty"),
        ({"prompt": IMAGE, "multi_modal_data": {"video": [image(1)]}}, r"\['video'\] with a text prompt.*torchvision"),
        ({"prompt_token_ids": [1, 2], "multi_modal_data": {"video": {"pixel_values_videos": torch.zeros(24, 96),
                                                                     "video_grid_thw": torch.tensor([[1, 4, 6]])}}},
         r"has 1 videos, more than limit_mm_per_prompt\['video'\]=0"),
        ({"prompt": "no placeholder", "multi_modal_data": {"image": image(1)}}, r"0 image placeholders"),
        ({"prompt_token_ids": [1, 2], "multi_modal_data": {"image": image(1)}}, r"is invalid with token ids"),
        ({"prompt": IMAGE, "multi_modal_data": {"image": image(1)}, "mm_processor_kwargs": {}},
         r"prompt\['mm_processor_kwargs'\]"),
    ]
    for prompt, field in bad:
        with pytest.raises(ValueError, match=field):
            llm.generate(prompt, params, use_tqdm=False)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.generate({"prompt": IMAGE, "multi_modal_data": {"image": image(1)}},
                     SamplingParams(max_tokens=2, truncate_prompt_tokens=4), use_tqdm=False)
    assert llm.generate({"prompt": IMAGE, "multi_modal_data": {"image": image(1)}}, params, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and not llm.engine.has_unfinished_requests()


@pytest.mark.slow
def test_images_off_serves_the_text_model_without_its_tower(mm_path):
    from tests.helpers.mm_checkpoints import IMAGE, image

    llm = LLM(mm_path, dtype="float64", num_kv_blocks=32, block_size=16, limit_mm_per_prompt={"image": 0})
    assert llm.engine.multimodal is None and llm.engine.executor.worker.runner.plugin("images") is None
    with pytest.raises(ValueError, match=r"prompt\['multi_modal_data'\] is not supported"):
        llm.generate({"prompt": IMAGE, "multi_modal_data": {"image": image(1)}}, use_tqdm=False)


def test_limit_mm_per_prompt_is_read_as_vllm_spells_it():
    from moelink.engine.config.multimodal import MultimodalConfig, parse_limit_mm_per_prompt

    assert parse_limit_mm_per_prompt('{"image": 4}') == parse_limit_mm_per_prompt("image=4") == {"image": 4, "video": 0}
    assert MultimodalConfig(limit_mm_per_prompt={"video": 2}).videos == 2
    for bad, field in [({"audio": 1}, "key 'audio'"), ({"image": -1}, r"\['image'\]=-1"), ({"video": -2}, "video")]:
        with pytest.raises(ValueError, match=field):
            MultimodalConfig(limit_mm_per_prompt=bad)


@pytest.mark.slow
def test_token_ids_with_the_processors_pixel_values_give_the_same_tokens(mm_path):
    """What smg's gRPC MultimodalInputs carries: ids with the placeholders expanded, the processor's pixel values and
    grids. The same tokens as the text path and transformers; a grid that does not match the ids is refused."""
    from moelink.engine.multimodal.processor import load_processor
    from tests.helpers.mm_checkpoints import IMAGE, hf_mm_greedy, image

    text, imgs = f"x {IMAGE} y {IMAGE}", [image(7, 16, 24), image(8, 24, 16)]
    out = load_processor(mm_path)(text=[text], images=imgs, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    llm = LLM(mm_path, dtype="float64", num_kv_blocks=64, block_size=16)
    pre = {"prompt_token_ids": ids, "multi_modal_data": {"image": {
        "pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}}}
    want = hf_mm_greedy(mm_path, text, imgs, MAX_NEW)
    assert _greedy(llm, pre) == want == _greedy(llm, {"prompt": text, "multi_modal_data": {"image": imgs}})
    swapped = out["image_grid_thw"].flip(0)  # 4x6 then 6x4 patches: same token counts, other shapes
    with pytest.raises(ValueError, match="pixel_values|placeholder runs"):
        _greedy(llm, {**pre, "multi_modal_data": {"image": {"pixel_values": out["pixel_values"][:-4],
                                                            "image_grid_thw": swapped}}})
    with pytest.raises(ValueError, match=r"placeholder runs \(id \d+\) of \[6, 6\] tokens: the images need runs of \[6\]"):
        _greedy(llm, {**pre, "multi_modal_data": {"image": {"pixel_values": out["pixel_values"][:24],
                                                            "image_grid_thw": out["image_grid_thw"][:1]}}})


@pytest.mark.slow
def test_smgs_grpc_mm_inputs_give_the_python_apis_tokens(mm_path):
    """VllmEngine.Generate with mm_inputs as smg 1.13 sends them (preprocessed pixel values, image_grid_thw, the
    placeholders expanded in tokenized.input_ids): the Python API's tokens; a video batch (modality VIDEO,
    video_grid_thw) in extra_mm_inputs beside the image's: transformers' tokens; mismatched grids, a second batch of
    one modality and a PD decode leg without pixels whose kv_transfer_params carry no mm_hashes are refused naming
    the field (served with them: tests/engine/test_multimodal_kv.py)."""
    import grpc
    import numpy as np
    from smg_grpc_proto.generated import common_pb2

    from moelink.engine.multimodal.processor import load_processor
    from tests.helpers.grpc_server import ThreadServer, make_stubs
    from tests.helpers.mm_checkpoints import IMAGE, VIDEO, hf_inputs_greedy, hf_mm_greedy, image, video_inputs

    text, img = f"see {IMAGE} here", image(9, 64, 64)  # 256 patches: 98 KiB of pixels, past the 64 KiB of a field
    out = load_processor(mm_path)(text=[text], images=[img], return_tensors="pt")
    from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
    from tests.helpers.net import free_port

    # A decode engine's connector (it loads, serves nothing): a decode leg takes kv_transfer_params.
    srv = ThreadServer(mm_path, dict(dtype="float64", num_kv_blocks=64, block_size=16,
                                     limit_mm_per_prompt={"image": 16, "video": 1},
                                     kv_connector=RemoteKVConnector(RemoteKVConfig(transport="tcp"))))
    try:
        stubs = make_stubs(grpc.insecure_channel(srv.addr))
        vpb = stubs.vpb
        pix, grid = out["pixel_values"].numpy().astype(np.float32), out["image_grid_thw"].numpy().astype(np.int64)

        def request(rid, **mm_kw):
            mm = vpb.MultimodalInputs(
                pixel_values=vpb.TensorData(shape=list(pix.shape), dtype="float32", inline=pix.tobytes()),
                model_specific_tensors={"image_grid_thw": vpb.TensorData(shape=list(grid.shape), dtype="int64",
                                                                         inline=grid.tobytes())}, **mm_kw)
            return vpb.GenerateRequest(
                request_id=rid, tokenized=vpb.TokenizedInput(input_ids=out["input_ids"][0].tolist()), mm_inputs=mm,
                sampling_params=vpb.SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True),
                stream=False)

        assert pix.nbytes > 64 << 10
        msgs = list(stubs.vllm.Generate(request("g-1", mm_hashes=["not-trusted"])))
        assert list(msgs[-1].complete.output_ids) == hf_mm_greedy(mm_path, text, [img], MAX_NEW)
        # An image in mm_inputs and a video in extra_mm_inputs (smg's batch per modality).
        both = video_inputs(mm_path, f"see {IMAGE} and {VIDEO}", [(8, 4, 4, 6)], images=[image(10, 16, 24)])

        def tensor(t, dtype):
            a = t.numpy().astype(dtype)
            return vpb.TensorData(shape=list(a.shape), dtype=np.dtype(dtype).name, inline=a.tobytes())

        def batch(pix_key, grid_key, **kw):
            return vpb.MultimodalInputs(pixel_values=tensor(both[pix_key], np.float32), model_specific_tensors={
                grid_key: tensor(both[grid_key], np.int64)}, **kw)

        def two(rid, extra):
            return vpb.GenerateRequest(
                request_id=rid, tokenized=vpb.TokenizedInput(input_ids=both["input_ids"][0].tolist()),
                mm_inputs=batch("pixel_values", "image_grid_thw"), extra_mm_inputs=extra,
                sampling_params=vpb.SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True),
                stream=False)

        video = batch("pixel_values_videos", "video_grid_thw", modality=common_pb2.VIDEO)
        msgs = list(stubs.vllm.Generate(two("g-v", [video])))
        assert list(msgs[-1].complete.output_ids) == hf_inputs_greedy(mm_path, both, MAX_NEW)
        with pytest.raises(grpc.RpcError, match=r"extra_mm_inputs\[0\] is a second image batch"):
            list(stubs.vllm.Generate(two("g-2", [batch("pixel_values", "image_grid_thw")])))
        short = batch("pixel_values_videos", "video_grid_thw", modality=common_pb2.VIDEO)
        short.model_specific_tensors["video_grid_thw"].CopyFrom(tensor(both["video_grid_thw"] * 0 + 1 + 1, np.int64))
        with pytest.raises(grpc.RpcError, match=r"extra_mm_inputs\[0\]\['pixel_values_videos'\] has 48 patch rows"):
            list(stubs.vllm.Generate(two("g-5", [short])))
        bad = request("g-3")
        bad.mm_inputs.model_specific_tensors["image_grid_thw"].CopyFrom(vpb.TensorData(
            shape=[1, 3], dtype="int64", inline=np.array([[1, 4, 4]], dtype=np.int64).tobytes()))
        with pytest.raises(grpc.RpcError, match=r"mm_inputs\['pixel_values'\] has 256 patch rows"):
            list(stubs.vllm.Generate(bad))
        # A decode leg without pixels whose kv_transfer_params name no mm_hashes (the prefill's): refused naming it.
        leg = request("g-4", mm_hashes=["h"])
        leg.mm_inputs.ClearField("pixel_values")
        leg.kv_transfer_params_json = ('{"do_remote_prefill": true, "remote_host": "127.0.0.1", "remote_port": 5600, '
                                       '"remote_kv_token": "' + "k" * 22 + '"}')
        with pytest.raises(grpc.RpcError, match=r"mm_inputs.pixel_values is missing on a decode request"):
            list(stubs.vllm.Generate(leg))
        # With mm_hashes (as a prefill server returns them) it is taken; its load fails here (no prefill server on
        # that port): it ends with FAILED_PRECONDITION naming why, no token computed without its pixels.
        leg.kv_transfer_params_json = leg.kv_transfer_params_json.replace(
            '"remote_port": 5600', f'"remote_port": {free_port()}')[:-1] + ', "mm_hashes": ["' + "ab" * 32 + '"]}'
        with pytest.raises(grpc.RpcError) as err:
            list(stubs.vllm.Generate(leg))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert "KV load failed" in err.value.details() and "without pixels" in err.value.details()
        assert srv.engine.engine.stats().num_free_blocks == srv.engine.engine.stats().num_total_blocks
    finally:
        srv.close()


def test_a_micro_batch_takes_its_own_image_rows_and_positions():
    import torch

    from moelink.engine.contract.forward_inputs import ImageSplice

    emb_MD = torch.arange(6.0).reshape(3, 2)
    pos_3T = torch.arange(24).reshape(3, 8)
    part = ImageSplice(torch.tensor([1, 5, 6]), emb_MD, pos_3T).select(4, 8)
    assert part.rows_M.tolist() == [1, 2] and torch.equal(part.embeds_MD, emb_MD[1:])
    assert torch.equal(part.mrope_3T, pos_3T[:, 4:8])
    x_TD = part.splice(torch.zeros(4, 2))
    assert torch.equal(x_TD[1:3], emb_MD[1:]) and not x_TD[0].any() and not x_TD[3].any()


@pytest.mark.slow
def test_a_chunk_encodes_only_the_images_it_reaches(mm_path):
    """Two images of 16 tokens behind a step budget of 8: the first steps encode the first image alone; the tokens
    equal transformers'."""
    from tests.helpers.mm_checkpoints import IMAGE, hf_mm_greedy, image

    text, imgs = f"{IMAGE} and {IMAGE} end", [image(11, 32, 32), image(12, 32, 32)]
    llm = LLM(mm_path, dtype="float64", max_num_batched_tokens=8, num_kv_blocks=64, block_size=8)
    eng = llm.engine
    eng.add_request("r", {"prompt": text, "multi_modal_data": {"image": imgs}},
                    SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
    cache = eng.executor.worker.runner.plugin("images").images.cache
    seen, out = [], None
    while eng.has_unfinished_requests():
        for o in eng.step():
            out = o if o.finished else out
        seen.append(cache.misses)
    assert seen[:2] == [1, 1] and seen[-1] == 2
    assert out.outputs[0].token_ids == hf_mm_greedy(mm_path, text, imgs, MAX_NEW)


@pytest.mark.slow
@pytest.mark.parametrize("p_right", [0.9, 0.0])
def test_speculative_decoding_verifies_drafts_at_the_images_positions(mm_path, p_right):
    """A verify step's drafts sit past the prompt: they turn by p + rope delta as decode tokens do. Drafts right
    with probability 0.9 (most accepted, some rejected, linear states rolled back), and always wrong: the greedy
    tokens equal transformers'."""
    import functools

    from moelink.benchmarks.spec_decode import OracleDrafter
    from moelink.engine.multimodal.processor import load_processor
    from tests.helpers.mm_checkpoints import IMAGE, hf_mm_greedy, image

    text, img = f"spec {IMAGE} test", image(13, 32, 32)
    ids = load_processor(mm_path)(text=[text], images=[img], return_tensors="pt")["input_ids"][0].tolist()
    want = hf_mm_greedy(mm_path, text, [img], MAX_NEW)
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, {tuple(ids): want}, p_right, vocab=404, seed=4)}
    llm = LLM(mm_path, dtype="float64", num_kv_blocks=64, block_size=8, speculative_config=spec)
    assert _greedy(llm, {"prompt": text, "multi_modal_data": {"image": img}}) == want
    sd = llm.engine.stats().spec_decode
    assert sd is not None and sd.num_draft_tokens > 0 and (sd.num_accepted_tokens > 0) == (p_right > 0)


# -- video (the processor's outputs: transformers' video processor needs torchvision) -------------------------------
@pytest.fixture(scope="module")
def video_llm(mm_path):
    return LLM(mm_path, dtype="float64", num_kv_blocks=64, block_size=8, num_state_checkpoints=8,
               limit_mm_per_prompt={"image": 2, "video": 2})


@pytest.mark.slow  # over 1 s (builds the module's video engine; transformers' generate twice)
def test_a_video_gives_transformers_tokens_and_another_video_misses_the_prefix_cache(mm_path, video_llm):
    """pixel_values_videos and video_grid_thw with the processor's ids (a timestamp and a run of placeholders per
    temporal patch): transformers' tokens (the tower on the video's patches, its 3-D positions per frame); another
    video behind the same ids gives its own tokens and shares no KV; the same video again hits."""
    from tests.helpers.mm_checkpoints import VIDEO, hf_inputs_greedy, video_inputs, video_prompt

    text = f"watch {VIDEO} and tell"
    a, b = video_inputs(mm_path, text, [(1, 4, 4, 6)]), video_inputs(mm_path, text, [(2, 4, 4, 6)])
    assert torch_equal(a["input_ids"], b["input_ids"])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)

    def run(inputs):
        return video_llm.generate(video_prompt(inputs), params, use_tqdm=False)[0]

    first, other, again = run(a), run(b), run(a)
    want_a, want_b = hf_inputs_greedy(mm_path, a, MAX_NEW), hf_inputs_greedy(mm_path, b, MAX_NEW)
    assert want_a != want_b
    assert first.outputs[0].token_ids == want_a == again.outputs[0].token_ids
    assert other.outputs[0].token_ids == want_b
    assert other.num_cached_tokens == 0 and again.num_cached_tokens > 0
    assert video_llm.engine.mm_stats.videos >= 3


@pytest.mark.slow  # the module's video engine (over 1 s to build where this runs first)
def test_a_video_and_an_image_give_transformers_tokens(mm_path, video_llm):
    from tests.helpers.mm_checkpoints import IMAGE, VIDEO, hf_inputs_greedy, image, video_inputs, video_prompt

    text = f"{IMAGE} then {VIDEO} compare"
    inputs = video_inputs(mm_path, text, [(3, 6, 4, 4)], images=[image(21, 16, 24)])
    assert _greedy(video_llm, video_prompt(inputs)) == hf_inputs_greedy(mm_path, inputs, MAX_NEW)


@pytest.mark.slow  # over 1 s (an engine of its own, transformers' generate twice)
def test_chunks_cut_inside_a_videos_frames_beside_a_text_request(mm_path):
    """A step budget of 5 tokens cuts the video's three frames (16 placeholders each, a timestamp between them)
    across chunks, batched with a text-only request; the video is encoded once, the tokens equal transformers'."""
    from tests.helpers.mm_checkpoints import VIDEO, hf_inputs_greedy, hf_mm_greedy, video_inputs, video_prompt

    text, plain = f"look {VIDEO} now", "hello there world"
    inputs = video_inputs(mm_path, text, [(4, 6, 8, 8)])
    llm = LLM(mm_path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=5, num_kv_blocks=32, block_size=8,
              limit_mm_per_prompt={"video": 1})
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([plain, video_prompt(inputs)], params, use_tqdm=False)
    assert outs[1].outputs[0].token_ids == hf_inputs_greedy(mm_path, inputs, MAX_NEW)
    assert outs[0].outputs[0].token_ids == hf_mm_greedy(mm_path, plain, [], MAX_NEW)
    assert llm.engine.executor.worker.runner.plugin("images").images.cache.misses == 1
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


@pytest.mark.slow  # the module's video engine (over 1 s to build where this runs first)
def test_bad_videos_are_refused_naming_the_field(mm_path, video_llm):
    from tests.helpers.mm_checkpoints import VIDEO, image, video_inputs, video_prompt

    inputs = video_inputs(mm_path, f"a {VIDEO} b", [(5, 4, 4, 6)])  # grid [2, 4, 6]: two runs of 6
    good = video_prompt(inputs)
    ids, video = good["prompt_token_ids"], good["multi_modal_data"]["video"]
    pix, grid = video["pixel_values_videos"], video["video_grid_thw"]
    three = video_prompt(video_inputs(mm_path, f"{VIDEO}{VIDEO}{VIDEO}", [(6, 2, 2, 2)] * 3))
    bad = [
        ({"video": {"pixel_values_videos": pix[:24], "video_grid_thw": grid.new_tensor([[1, 4, 6]])}},
         r"video placeholder runs \(id \d+\) of \[6, 6\] tokens: the videos' grids \[\[1, 4, 6\]\] need runs of \[6\]"),
        ({"video": {"pixel_values_videos": pix.reshape(48, 3, 32), "video_grid_thw": grid}},
         r"\['video'\]\['pixel_values_videos'\] has shape \(48, 3, 32\)"),
        ({"video": {"pixel_values_videos": pix[:-1], "video_grid_thw": grid}},
         r"\['video'\]\['pixel_values_videos'\] has 47 patch rows"),
        ({"video": {"pixel_values": pix, "video_grid_thw": grid}}, r"exactly 'pixel_values_videos' and"),
        ({"image": {"pixel_values": pix[:24], "image_grid_thw": grid.new_tensor([[1, 4, 6]])}},  # no video data
         r"image placeholder runs \(id \d+\) of \[\] tokens"),
    ]
    for data, field in bad:
        with pytest.raises(ValueError, match=field):
            video_llm.generate({"prompt_token_ids": ids, "multi_modal_data": data}, use_tqdm=False)
    with pytest.raises(ValueError, match=r"has 3 videos, more than limit_mm_per_prompt\['video'\]=2"):
        video_llm.generate(three, use_tqdm=False)
    # An image's placeholders between the video's two frames: refused (a video's runs follow each other).
    mm = video_llm.engine.multimodal
    img, vid = [mm.image_token_id] * 6, [mm.video_token_id] * 6
    with pytest.raises(ValueError, match=r"an image's placeholders \(at 9\) between the frames of video 0"):
        video_llm.generate({"prompt_token_ids": [1] + vid + [2, 3] + img + [4] + vid, "multi_modal_data": {
            "video": video, "image": {"pixel_values": pix[:24], "image_grid_thw": grid.new_tensor([[1, 4, 6]])}}},
            use_tqdm=False)
    with pytest.raises(ValueError, match=r"\['video'\] with a text prompt is not supported: .*torchvision"):
        video_llm.generate({"prompt": VIDEO, "multi_modal_data": {"video": [image(1), image(2)]}}, use_tqdm=False)
    stats = video_llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and not video_llm.engine.has_unfinished_requests()


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_grids_without_pixels_with_the_prefills_hashes_give_the_same_positions_and_salt(mm_path):
    """A PD decode leg without pixels (smg's PD mode; docs/multimodal.md): an image and a video as grids alone, with
    the hashes the prefill computed from their pixels, get the same 3-D positions, rope delta and cache salt as with
    the pixels, and load only (MultimodalInputs.pixels False); pixels for one modality and not the other, and
    grids alone without relayed hashes, are refused."""
    from moelink.engine.config.multimodal import MultimodalConfig
    from moelink.engine.multimodal.processor import ImageProcessor
    from tests.helpers.mm_checkpoints import IMAGE, VIDEO, image, video_inputs

    both = video_inputs(mm_path, f"see {IMAGE} and {VIDEO}", [(8, 4, 4, 6)], images=[image(10, 16, 24)])
    p = ImageProcessor(mm_path, MultimodalConfig(limit_mm_per_prompt={"image": 16, "video": 1}))
    ids = both["input_ids"][0].tolist()
    img = {k: both[k] for k in ("pixel_values", "image_grid_thw")}
    vid = {k: both[k] for k in ("pixel_values_videos", "video_grid_thw")}
    full = p.process_preprocessed(ids, {"image": img, "video": vid})
    relayed = tuple(h.hex() for h in (*full.image_hashes, *full.video_hashes))
    grids = {"image": {"image_grid_thw": both["image_grid_thw"]}, "video": {"video_grid_thw": both["video_grid_thw"]}}
    bare = p.process_preprocessed(ids, grids, relayed=relayed)
    assert not bare.pixels and bare.cache_salt == full.cache_salt and bare.mrope_delta == full.mrope_delta
    assert bare.mrope_3L.tolist() == full.mrope_3L.tolist()
    with pytest.raises(ValueError, match="some items come with pixels and some without"):
        p.process_preprocessed(ids, {"image": img, "video": grids["video"]}, relayed=relayed)
    with pytest.raises(ValueError, match="without 'pixel_values'.*mm_hashes"):
        p.process_preprocessed(ids, grids)
