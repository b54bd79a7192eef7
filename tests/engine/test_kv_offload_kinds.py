"""The KV offload tiers for every KV kind they serve: MLA's latent and an fp8 cache (GQA's k and v:
test_kv_offload.py) evicted to host memory and loaded back, greedy outputs equal to one engine without offload;
a cache without prefix caching refused at start; the tiers beside a PD connector."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector
from moelink.scheduler.kv_cache_manager import KVCacheManager

from tests.helpers.parity import prompts

KW = dict(dtype="float64", num_kv_blocks=20, block_size=4, max_num_batched_tokens=64, max_model_len=64,
          skip_warmup=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def _tokens(llm, p):
    o = llm.generate([p], GREEDY, use_tqdm=False)[0]
    return o.outputs[0].token_ids, o.num_cached_tokens


@pytest.mark.parametrize("kind", ["mla", "fp8"])
def test_an_evicted_prefix_of_every_kv_kind_loads_back(kind, hf_tiny_model):
    path = hf_tiny_model("dsv3_lora" if kind == "mla" else "glm_bias")
    kw = dict(KW, kv_cache_dtype="fp8") if kind == "fp8" else KW
    target, *others = prompts(200, seed=41, n=4, lo=40, hi=41)
    with LLM(path, **kw) as llm:
        want = _tokens(llm, target)[0]
    conn = OffloadKVConnector(OffloadConfig(host_bytes=1 << 30))
    with LLM(path, kv_connector=conn, **kw) as llm:
        _tokens(llm, target)
        for p in others:
            _tokens(llm, p)
        assert _tokens(llm, target) == (want, 39)
        assert llm.engine.schedulers[0].kv.pool.num_free_blocks == KW["num_kv_blocks"]
    assert conn.offload_tier_stats()["host"].hits == 10


def test_a_cache_without_prefix_caching_is_refused_at_start():
    # A sliding-window table (gpt-oss) and per-sequence state (Qwen3-Next): test_kv_offload_state.py.
    kv = KVCacheManager(8, 4, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="needs prefix caching"):
        OffloadKVConnector(OffloadConfig(host_bytes=1)).scheduler_side(0).bind(kv)


def test_a_prefill_engine_with_tiers_loads_an_evicted_prefix_then_saves_the_whole_prompt_for_decode(tiny_model):
    """The offload tiers beside a PD connector (engine/kv_transfer/offload_compose.py; the in-host reference
    stands for the remote one): the prefill engine loads the target's evicted prefix from its host tier, computes
    the last token and saves the whole prompt; the decode engine loads that and decodes as one engine would."""
    from moelink.engine.kv_transfer.inhost import InHostKVConnector, InHostKVStore
    from moelink.engine.kv_transfer.offload_compose import WithOffload

    path = tiny_model("qwen3_e6k3")
    target, *others = prompts(200, seed=31, n=4, lo=40, hi=41)
    with LLM(path, **KW) as llm:
        want = _tokens(llm, target)[0]
    store = InHostKVStore()
    prefill = WithOffload(InHostKVConnector(store, load=False), OffloadKVConnector(OffloadConfig(host_bytes=1 << 30)))
    with LLM(path, kv_connector=prefill, **KW) as llm:
        one = SamplingParams(temperature=0.0, max_tokens=1)
        for rid, p in [("t0", target)] + [(f"o{i}", p) for i, p in enumerate(others)] + [("t", target)]:
            llm.engine.add_request(rid, p, one)
            while llm.engine.has_requests():
                llm.engine.step()
    assert prefill.offload_tier_stats()["host"].hits == 10 and "t" in store
    with LLM(path, kv_connector=InHostKVConnector(store, save=False), **KW) as llm:
        llm.engine.add_request("t", target, GREEDY)
        got = {}
        while llm.engine.has_requests():
            got.update({o.request_id: o.outputs[0].token_ids for o in llm.engine.step() if o.finished})
    assert got["t"] == want and store.num_loaded == 1 and store.num_failed == 0
