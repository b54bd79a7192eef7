"""The KV offload tiers (engine/kv_transfer/offload.py, offload_tiers.py): a prompt whose prefix the device prefix
cache has evicted is loaded back from host memory (or from disk, past the host tier's bytes) instead of
recomputed; greedy outputs equal one engine without offload; the tiers stay within their bytes, LRU."""
from __future__ import annotations

import os

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector, OffloadTiers
from moelink.engine.kv_transfer.offload_tiers import block_keys

from tests.helpers.parity import prompts

# 20 blocks of 4 tokens: the device prefix cache can hold one 40-token prompt and little else.
KW = dict(dtype="float64", num_kv_blocks=20, block_size=4, max_num_batched_tokens=64, max_model_len=64,
          skip_warmup=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def _run(llm, ps):
    return [(o.outputs[0].token_ids, o.num_cached_tokens) for o in llm.generate(ps, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def case(tiny_model):
    path = tiny_model("qwen3_e6k3")
    target, *others = prompts(200, seed=31, n=4, lo=40, hi=41)  # 40 tokens each: 10 blocks
    with LLM(path, **KW) as llm:
        want = _run(llm, [target])[0][0]
    return path, target, others, want


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_an_evicted_prefix_is_loaded_back_from_its_tier_not_recomputed(case, tier, tmp_path):
    path, target, others, want = case
    # "disk": a host tier of two blocks' bytes, so the target's blocks are pushed down to files as others arrive.
    block_bytes = 2 * 4 * 2 * 16 * 8 * 2  # k and v, B=4, 2 kv heads x 16, float64, x 2 layers (qwen3_e6k3)
    cfg = (OffloadConfig(host_bytes=1 << 30) if tier == "host"
           else OffloadConfig(host_bytes=2 * block_bytes, disk_bytes=1 << 30, disk_dir=str(tmp_path / "kv")))
    tiers = OffloadTiers(cfg)
    with LLM(path, kv_connector=OffloadKVConnector(tiers), **KW) as llm:
        assert _run(llm, [target]) == [(want, 0)]  # computed, written through to the tiers
        for p in others:  # each fills the device pool: the target's blocks are evicted from the prefix cache
            _run(llm, [p])
        got = _run(llm, [target])
    assert got[0][0] == want
    assert got[0][1] == 39  # 10 blocks held below the device; the last prompt token computed here for its logits
    assert tiers.stats[tier].hits == 10 and tiers.stats[tier].loaded_bytes > 0
    if tier == "disk":
        assert tiers.stats["host"].evicted > 0 and tiers.held_bytes()[0] <= 2 * block_bytes
    tiers.close()
    if tier == "disk":
        assert os.listdir(tmp_path / "kv") == []


def test_the_tiers_are_lru_within_their_bytes_and_name_bad_settings(tmp_path):
    def rows(v):
        return ((torch.full((1, 4, 8), v, dtype=torch.uint8),),)  # 32 bytes

    tiers = OffloadTiers(OffloadConfig(host_bytes=64, disk_bytes=64, disk_dir=str(tmp_path)))
    for k in "abcd":
        tiers.put(k, rows(ord(k)))
    # host holds c, d; b and a went to disk; then a is read back (promoted: d's... c goes down, a is on top)
    assert tiers.held_bytes() == (64, 64) and tiers.num_leading(["a", "b", "c", "d", "e"]) == 4
    assert torch.equal(tiers.get("a")[0][0], rows(ord("a"))[0][0]) and tiers.stats["disk"].hits == 1
    tiers.put("e", rows(ord("e")))  # pushes the least recent down; disk's oldest is deleted
    assert tiers.num_leading(["a"]) == 1 and tiers.stats["disk"].evicted >= 1
    assert block_keys(list(range(9)), 4) == block_keys(list(range(8)) + [99], 4)  # full blocks only, chained
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8], 4)[1] != block_keys([0, 2, 3, 4, 5, 6, 7, 8], 4)[1]
    with pytest.raises(ValueError, match="host_bytes"):
        OffloadConfig(host_bytes=0)
    with pytest.raises(ValueError, match="disk_dir"):
        OffloadConfig(disk_bytes=10)
    tiers.close()


def test_the_serve_flags_build_the_offload_connector_for_one_engine_only(tmp_path):
    import argparse

    from moelink.engine.api.kv_args import add_role_args, role_from_args

    p = argparse.ArgumentParser()
    add_role_args(p)
    role = role_from_args(p.parse_args(["--kv-offload-host-bytes", "1000", "--kv-offload-disk-bytes", "2000",
                                        "--kv-offload-dir", str(tmp_path / "d")]), 1)
    conn = role.connector()
    assert isinstance(conn, OffloadKVConnector) and conn.tiers.config.disk_bytes == 2000 and role.kv_role == ""
    assert os.path.isdir(tmp_path / "d")
    with pytest.raises(ValueError, match="^--kv-offload-host-bytes is invalid with --role"):
        role_from_args(p.parse_args(["--role", "decode", "--kv-offload-host-bytes", "1000"]), 1)
    with pytest.raises(ValueError, match="disk_dir"):
        role_from_args(p.parse_args(["--kv-offload-host-bytes", "1000", "--kv-offload-disk-bytes", "5"]), 1)
    assert role_from_args(p.parse_args([]), 1).connector() is None
