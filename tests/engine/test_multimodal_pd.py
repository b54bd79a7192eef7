"""Images through prefill/decode disaggregation (issue 59, docs/multimodal.md#prefilldecode-disaggregation): a
Qwen3.5-MoE multimodal prefill engine saves an image prompt's KV (its full-attention blocks and its linear layers'
states: a hybrid model moves the first n - 1 tokens), a decode engine in the same process loads it over tcp (the
transport the in-process disaggregation tests use) and computes the last prompt token and the rest at Qwen's 3-D
positions (its rope delta recomputed from the images it carries). Against transformers' generate in float64:

- the pair's greedy tokens equal transformers' (and so one engine's), the decode side computing one prompt token;
- a decode request with another image behind the same text, naming that save, finds no KV (the save is keyed by its
  images' hashes: engine/kv_transfer/auth.salted_key), is recomputed with its own image and gives transformers'
  tokens for it; the decode side's prefix cache then holds both prompts' blocks apart (keyed by the hashes);
- a decode request whose ids hold placeholders but no images is refused naming the field;
- both engines end with every block free.
"""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.contract.kv_transfer_params import KVTransferParams
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
from moelink.scheduler.block_pool import root_block_hash

from tests.helpers.net import free_port

NEW = 4
SECRET = b"multimodal-pd-test-secret-0123456789"  # a decode engine registers loaded KV for reuse only with one
KW = dict(dtype="float64", num_kv_blocks=64, block_size=8, skip_warmup=True)


@pytest.mark.slow  # over 1 s (two engines and transformers' generate twice, ~15 CPU-s)
def test_an_image_prompt_through_a_pd_pair_gives_transformers_tokens_keyed_by_its_image(tmp_path):
    from tests.helpers.mm_checkpoints import IMAGE, hf_mm_greedy, image, save_mm_checkpoint

    path = save_mm_checkpoint(tmp_path)
    text = f"look at {IMAGE} and say"
    a, b = image(4, 32, 32), image(5, 32, 32)  # 16 placeholder tokens each
    want_a, want_b = hf_mm_greedy(path, text, [a], NEW), hf_mm_greedy(path, text, [b], NEW)
    assert want_a != want_b
    prompt = {"prompt": text, "multi_modal_data": {"image": a}}
    other = {"prompt": text, "multi_modal_data": {"image": b}}

    pre = LLM(path, kv_connector=RemoteKVConnector(RemoteKVConfig(port=free_port(), transport="tcp", secret=SECRET)),
              **KW)
    dec = None
    try:
        save = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                              kv_transfer_params=KVTransferParams(do_remote_decode=True))
        [saved] = pre.generate([prompt], save, use_tqdm=False)
        assert saved.outputs[0].token_ids == want_a[:1] and saved.kv_transfer_params is not None
        dec = LLM(path, kv_connector=RemoteKVConnector(RemoteKVConfig(transport="tcp", secret=SECRET)), **KW)
        load = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True,
                              kv_transfer_params=saved.kv_transfer_params)
        # Image b behind the same tokens, naming image a's save: nothing under its key; recomputed with b.
        [wrong] = dec.generate([other], load, use_tqdm=False)
        assert wrong.outputs[0].token_ids == want_b and wrong.num_cached_tokens == 0
        stats = dec.engine.executor.runner.kv_connector.stats
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
        for llm in (pre, dec):
            s = llm.engine.stats()
            assert s.num_free_blocks == s.num_total_blocks
    finally:
        for llm in (dec, pre):
            if llm is not None:
                llm.engine.shutdown()
