"""An image prompt's KV beyond one engine's device pool (issue 59, docs/multimodal.md#kv-beyond-the-device-pool):
moved between engines by prefill/decode disaggregation, and stored in the offload tiers, always under the image
hashes as well as the tokens. A tiny Qwen3.5-MoE multimodal checkpoint (a hybrid model: its linear layers' states
move with the full-attention blocks), against transformers' generate in float64; the same text behind two images of
one size (the same placeholder tokens), which transformers answers differently.

Prefill/decode: a prefill engine saves the prompt's KV, a decode engine in the same process loads it over tcp (the
transport of the in-process disaggregation tests) and computes the last prompt token and the rest at Qwen's 3-D
positions (its rope delta recomputed from the images it carries).
- the pair's greedy tokens equal transformers', the decode side computing one prompt token;
- a decode request with the other image, naming that save, finds no KV (the save is keyed by its images' hashes:
  engine/kv_transfer/auth.salted_key), is recomputed with its own image and gives transformers' tokens for it; the
  decode side's prefix cache then holds both prompts' blocks apart;
- a decode request whose ids hold placeholders but no images is refused naming the field;
- a decode request as smg's PD mode sends it (ids and grids, no pixels) with the prefill's kv_transfer_params (their
  mm_hashes: the prefill's own hashes) loads and gives transformers' tokens; with another image's hash it finds no
  KV and ends with an error naming mm_hashes (never computed as text); without mm_hashes, with a hash count the grids
  do not take, or with its last prompt token inside the image it is refused naming the field;
- both engines end with every block free.

Offload: the device evicts the prompt's blocks to the host tier; the same text with the other image misses there
(computed, its own tokens), the first image again loads them back (transformers' tokens).
"""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.contract.kv_transfer_params import KVTransferParams
from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
from moelink.scheduler.block_pool import root_block_hash

from tests.helpers.net import free_port

pytestmark = pytest.mark.slow  # over 1 s (engines on a Qwen3.5 multimodal checkpoint, transformers' generate)

NEW = 4
SECRET = b"multimodal-pd-test-secret-0123456789"  # a decode engine registers loaded KV for reuse only with one
KW = dict(dtype="float64", num_kv_blocks=64, block_size=8, skip_warmup=True)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(checkpoint, text, image a, image b, transformers' tokens for a, for b)."""
    from tests.helpers.mm_checkpoints import IMAGE, hf_mm_greedy, image, save_mm_checkpoint

    path = save_mm_checkpoint(tmp_path_factory.mktemp("qwen35_mm"))
    text = f"look at {IMAGE} and say"
    a, b = image(4, 32, 32), image(5, 32, 32)  # 16 placeholder tokens each
    want_a, want_b = hf_mm_greedy(path, text, [a], NEW), hf_mm_greedy(path, text, [b], NEW)
    assert want_a != want_b
    return path, text, a, b, want_a, want_b


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, **{"max_tokens": NEW, **kw})


def test_an_image_prompt_through_a_pd_pair_gives_transformers_tokens_keyed_by_its_image(case):
    path, text, a, b, want_a, want_b = case
    prompt, other = ({"prompt": text, "multi_modal_data": {"image": img}} for img in (a, b))
    pre = LLM(path, kv_connector=RemoteKVConnector(RemoteKVConfig(port=free_port(), transport="tcp", secret=SECRET)),
              **KW)
    dec = None
    try:
        [saved] = pre.generate([prompt], _greedy(max_tokens=1, kv_transfer_params=KVTransferParams(
            do_remote_decode=True)), use_tqdm=False)
        assert saved.outputs[0].token_ids == want_a[:1] and saved.kv_transfer_params is not None
        dec = LLM(path, kv_connector=RemoteKVConnector(RemoteKVConfig(transport="tcp", secret=SECRET)), **KW)
        load = _greedy(kv_transfer_params=saved.kv_transfer_params)
        # Image b behind the same tokens, naming image a's save: nothing under its key; recomputed with b.
        [wrong] = dec.generate([other], load, use_tqdm=False)
        assert wrong.outputs[0].token_ids == want_b and wrong.num_cached_tokens == 0
        stats = dec.engine.executor.runner.plugin("kv_transfer").connector.stats
        assert stats.num_failed == 1 and stats.num_loaded == 0
        # Image a with its own save: loaded (n - 1 tokens), the last prompt token and the rest computed here.
        [got] = dec.generate([prompt], load, use_tqdm=False)
        ids = got.prompt_token_ids
        assert got.outputs[0].token_ids == want_a and got.num_cached_tokens == len(ids) - 1
        assert stats.num_loaded == 1
        # The decode side's prefix cache: each image's blocks under its own hashes, none shared.
        pool, proc = dec.engine.schedulers[0].kv.pool, dec.engine.multimodal
        blocks = [pool.find_cached_prefix(ids, root_block_hash(proc.process(text, {"image": img})[1].cache_salt))
                  for img in (a, b)]
        assert all(blocks) and not set(blocks[0]) & set(blocks[1])
        # A decode request whose ids hold placeholders but carries no images: refused naming the field.
        with pytest.raises(ValueError, match="no multi_modal_data"):
            dec.generate([{"prompt_token_ids": ids}], load, use_tqdm=False)
        _decode_legs_without_pixels(pre, dec, prompt, ids, want_a, proc.process(text, {"image": b})[1].image_hashes[0])
        for llm in (pre, dec):
            s = llm.engine.stats()
            assert s.num_free_blocks == s.num_total_blocks
    finally:
        for llm in (dec, pre):
            if llm is not None:
                llm.engine.shutdown()


def _decode_legs_without_pixels(pre, dec, prompt, ids, want, other_hash: bytes):
    """Decode requests as smg's PD mode sends them: the ids and grids, no pixels, the prefill's kv_transfer_params
    (its mm_hashes: moelink's hashes of the pixels). Served from the loaded KV; other hashes, none, or a last prompt
    token inside the image: refused or ended with an error naming the field, never computed as text."""
    import dataclasses

    saves = pre.generate([prompt, prompt], _greedy(max_tokens=1, kv_transfer_params=KVTransferParams(
        do_remote_decode=True)), use_tqdm=False)
    mm = dec.engine.multimodal.process(prompt["prompt"], prompt["multi_modal_data"])[1]
    p0, p1 = (s.kv_transfer_params for s in saves)
    assert p0.mm_hashes == tuple(h.hex() for h in mm.image_hashes)  # the prefill's own, relayed in its output
    grids = {"image": {"image_grid_thw": [list(g) for g in mm.image_grid_thw]}}  # no pixel_values
    leg = {"prompt_token_ids": ids, "multi_modal_data": grids}
    [got] = dec.generate([leg], _greedy(kv_transfer_params=p0), use_tqdm=False)
    assert got.outputs[0].token_ids == want and got.num_cached_tokens == len(ids) - 1
    # Another image's hash with a real capability: the salted key opens nothing, the load fails, the request ends.
    forged = dataclasses.replace(p1, mm_hashes=(other_hash.hex(),))
    [bad] = dec.generate([leg], _greedy(kv_transfer_params=forged), use_tqdm=False)
    assert bad.outputs[0].finish_reason == "error" and bad.outputs[0].token_ids == []
    assert "mm_hashes" in str(bad.outputs[0].stop_reason) and "KV load failed" in str(bad.outputs[0].stop_reason)
    for params, match in ((dataclasses.replace(p1, mm_hashes=None), "mm_hashes"),
                          (dataclasses.replace(p1, mm_hashes=p1.mm_hashes * 2), "mm_hashes has 2 hashes")):
        with pytest.raises(ValueError, match=match):
            dec.generate([leg], _greedy(kv_transfer_params=params), use_tqdm=False)
    end = max(i for i, t in enumerate(ids) if t == dec.engine.multimodal.image_token_id) + 1
    with pytest.raises(ValueError, match="last token is an image or video placeholder"):
        dec.generate([{"prompt_token_ids": ids[:end], "multi_modal_data": grids}], _greedy(kv_transfer_params=p1),
                     use_tqdm=False)


def test_the_host_tier_keys_an_image_prompts_blocks_by_its_image(case):
    from tests.helpers.parity import prompts

    path, text, a, b, want_a, want_b = case
    conn = OffloadKVConnector(OffloadConfig(host_bytes=1 << 30))
    with LLM(path, kv_connector=conn, **dict(KW, num_kv_blocks=24, block_size=4)) as llm:
        def run(p):
            out = llm.generate([p], _greedy(), use_tqdm=False)[0]
            return out.outputs[0].token_ids, out.num_cached_tokens

        assert run({"prompt": text, "multi_modal_data": {"image": a}}) == (want_a, 0)
        for p in prompts(400, seed=61, n=3, lo=40, hi=41):  # text ids below the vision tokens (400-403)
            run(p)  # each fills the device pool: image a's blocks go to the host tier
        host = conn.offload_tier_stats()["host"]
        assert host.stored > 0 and host.hits == 0
        assert run({"prompt": text, "multi_modal_data": {"image": b}}) == (want_b, 0)  # missed in the tier
        assert conn.offload_tier_stats()["host"].hits == 0
        tokens, cached = run({"prompt": text, "multi_modal_data": {"image": a}})  # loaded back from the tier
        assert tokens == want_a and cached > 0 and conn.offload_tier_stats()["host"].hits > 0
