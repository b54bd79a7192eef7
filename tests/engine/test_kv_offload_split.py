"""A decode server's offload tier serves part of a PD request's prompt (engine/kv_transfer/offload_compose.py's
SplitLoad): the leading blocks its host tier holds (a shared prefix it evicted) load from there, only the rest
from the prefill engine's save. The in-host reference stands for the remote connector; no Ray."""
from __future__ import annotations

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.inhost import InHostKVConnector, InHostKVStore
from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector
from moelink.engine.kv_transfer.offload_compose import WithOffload

from tests.helpers.parity import prompts

KW = dict(dtype="float64", num_kv_blocks=20, block_size=4, max_num_batched_tokens=64, max_model_len=64,
          skip_warmup=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
ONE = SamplingParams(temperature=0.0, max_tokens=1)


def _run(llm, reqs, params) -> dict[str, tuple[list[int], int]]:
    got = {}
    for rid, p in reqs:  # one at a time: each later one evicts the earlier ones' blocks from a 20-block pool
        llm.engine.add_request(rid, p, params)
        while llm.engine.has_requests():
            for o in llm.engine.step():
                if o.finished:
                    got[o.request_id] = (o.outputs[0].token_ids, o.num_cached_tokens)
    return got


def test_a_decode_servers_tier_serves_the_shared_prefix_and_the_prefill_engine_the_rest(tiny_model):
    path = tiny_model("qwen3_e6k3")
    shared = prompts(200, seed=61, n=1, lo=28, hi=29)[0]  # 7 blocks of a shared system prompt
    tails = prompts(200, seed=62, n=2, lo=12, hi=13)
    a, b = shared + tails[0], shared + tails[1]  # the same first 7 blocks
    others = prompts(200, seed=63, n=3, lo=40, hi=41)
    reqs = [("a", a)] + [(f"o{i}", p) for i, p in enumerate(others)] + [("b", b)]
    with LLM(path, **KW) as llm:
        want = {rid: out for rid, (out, _) in _run(llm, reqs, GREEDY).items()}
    store = InHostKVStore()
    with LLM(path, kv_connector=InHostKVConnector(store, load=False), **KW) as llm:  # the prefill engine
        _run(llm, reqs, ONE)
    tiers = OffloadKVConnector(OffloadConfig(host_bytes=1 << 30))
    pd = InHostKVConnector(store, save=False)
    with LLM(path, kv_connector=WithOffload(pd, tiers), **KW) as llm:  # the decode engine
        got = _run(llm, reqs, GREEDY)
        assert llm.engine.schedulers[0].kv.pool.num_free_blocks == KW["num_kv_blocks"]
    assert {rid: out for rid, (out, _) in got.items()} == want
    assert {rid: c for rid, (_, c) in got.items()} == {rid: len(p) - 1 for rid, p in reqs}  # all but the last
    # "a"'s blocks went to the host tier as the others evicted them; "b" took the 7 shared ones from there.
    assert tiers.offload_tier_stats()["host"].hits == 7
    assert store.num_loaded == len(reqs) and store.num_failed == 0

