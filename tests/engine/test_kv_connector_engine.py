"""The KV connector seam end to end with the in-host reference (engine/kv_transfer/inhost.py): engine A prefills
and saves each prompt's KV, engine B (another LLM, same checkpoint) loads it instead of prefilling and decodes,
and B's greedy outputs equal one engine's that did everything itself, for every KV kind: GQA's (k, v), MLA's
latent, gpt-oss's full and sliding tables on shared tensors, an fp8 cache. A load into a cache of another layout
fails and the request is recomputed. float64: B computes the last prompt token alone where the single engine
computed it inside its prompt's batch, so the two differ only by rounding far below the tiny models' near-ties."""
from __future__ import annotations

import pickle

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.inhost import InHostKVConnector, InHostKVStore

from tests.helpers.gpt_oss_checkpoints import save_gpt_oss
from tests.helpers.parity import prompts

MAX_NEW = 6


@pytest.fixture(scope="module")
def gpt_oss_paired(tmp_path_factory):
    return save_gpt_oss(tmp_path_factory.mktemp("kv_gpt_oss"), num_hidden_layers=2)


def _path(kind, tiny_model, hf_tiny_model, gpt_oss_paired):
    return {"gqa": lambda: tiny_model("qwen3_e6k3"), "mla": lambda: hf_tiny_model("dsv3_lora"),
            "sliding": lambda: gpt_oss_paired, "fp8": lambda: hf_tiny_model("glm_bias")}[kind]()


def _generate(path, ps, kind, connector=None, max_tokens=MAX_NEW, block_size=4, **kw):
    """Greedy outputs, and the tokens the engine computed (prompt and decode) over the whole run."""
    if kind == "fp8":
        kw["kv_cache_dtype"] = "fp8"
    with LLM(path, dtype="float64", num_kv_blocks=96, block_size=block_size, max_num_batched_tokens=32,
             max_model_len=128, skip_warmup=True, kv_connector=connector, **kw) as llm:
        computed = []
        real = llm.engine.executor.launch

        def launch(sched_outs):
            computed.append(sum(so.total_num_scheduled_tokens for so in sched_outs))
            return real(sched_outs)

        llm.engine.executor.launch = launch
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)]
        stats = llm.engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks  # nothing leaked, transfers' blocks included
    return outs, sum(computed)


@pytest.mark.parametrize("kind", ["gqa", "mla", "sliding", "fp8"])
def test_prefill_on_one_engine_decode_on_another(kind, tiny_model, hf_tiny_model, gpt_oss_paired):
    path = _path(kind, tiny_model, hf_tiny_model, gpt_oss_paired)
    ps = prompts(200, seed=3, n=4, lo=5, hi=23)  # one block and a bit, up to six blocks; partial last blocks
    want, _ = _generate(path, ps, kind)

    store = InHostKVStore()
    _generate(path, ps, kind, InHostKVConnector(store, load=False), max_tokens=1)
    assert len(store) == len(ps) and store.num_saved == len(ps)

    got, computed = _generate(path, ps, kind, InHostKVConnector(store, save=False))
    assert got == want
    assert store.num_loaded == len(ps) and len(store) == 0 and store.num_failed == 0
    # B computed each prompt's last token only, then decoded: MAX_NEW tokens per request in all.
    assert computed == len(ps) * MAX_NEW


def test_load_after_a_prefix_cache_hit_copies_only_the_blocks_past_it(tiny_model, monkeypatch):
    from moelink.engine.contract.kv_blocks import PagedKVBlocks

    path = tiny_model("qwen3_e6k3")
    shared = prompts(200, seed=6, n=2, lo=8, hi=8)[0]  # two blocks of 4
    ps = [shared + tail for tail in prompts(200, seed=7, n=3, lo=3, hi=9)]
    want, _ = _generate(path, ps, "gqa")
    store = InHostKVStore()
    _generate(path, ps, "gqa", InHostKVConnector(store, load=False), max_tokens=1)
    first_blocks = []
    real_write = PagedKVBlocks.write
    monkeypatch.setattr(PagedKVBlocks, "write", lambda self, t, saved: (first_blocks.append(t.first_block),
                                                                        real_write(self, t, saved))[1])
    with LLM(path, dtype="float64", num_kv_blocks=96, block_size=4, skip_warmup=True,
             kv_connector=InHostKVConnector(store, save=False)) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        llm.engine.add_request("warm", shared + [1], SamplingParams(temperature=0.0, max_tokens=1))
        while llm.engine.has_requests():
            llm.engine.step()
        for i, p in enumerate(ps):  # the ids engine A's LLM.generate gave them
            llm.engine.add_request(str(i), p, params)
        got = {}
        while llm.engine.has_requests():
            got.update({o.request_id: o.outputs[0].token_ids for o in llm.engine.step() if o.finished})
    assert [got[str(i)] for i in range(len(ps))] == want
    assert first_blocks == [2] * len(ps) and store.num_loaded == len(ps)


def test_a_load_into_another_layout_is_recomputed(tiny_model):
    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=4, n=3, lo=6, hi=14)
    want, _ = _generate(path, ps, "gqa")
    store = InHostKVStore()
    _generate(path, ps, "gqa", InHostKVConnector(store, load=False), max_tokens=1, block_size=4)
    got, computed = _generate(path, ps, "gqa", InHostKVConnector(store, save=False), block_size=8)
    assert got == want and store.num_failed == len(ps) and store.num_loaded == 0
    assert computed == sum(map(len, ps)) + len(ps) * (MAX_NEW - 1)  # every prompt computed after all


def test_serial_loop_and_no_connector_by_default(tiny_model):
    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=5, n=3, lo=4, hi=12)
    want, _ = _generate(path, ps, "gqa", async_scheduling=False)
    store = InHostKVStore()
    _generate(path, ps, "gqa", InHostKVConnector(store), max_tokens=1, async_scheduling=False)
    got, computed = _generate(path, ps, "gqa", InHostKVConnector(store), async_scheduling=False)
    assert got == want and computed == len(ps) * MAX_NEW
    assert len(store) == len(ps)  # saving and loading: B saved the prompts it loaded again
    with LLM(path, dtype="float64", num_kv_blocks=32, block_size=4, skip_warmup=True) as llm:
        assert all(s.kv_transfers is None for s in llm.engine.schedulers)
        assert llm.engine.executor.runner.plugin("kv_transfer") is None


def test_the_in_host_connector_stays_in_its_process():
    with pytest.raises(TypeError, match="one process"):
        pickle.dumps(InHostKVConnector(InHostKVStore()))
