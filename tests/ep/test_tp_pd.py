"""Prefill/decode disaggregation under tensor parallelism (engine/kv_transfer/tp_shard.py): a prefill engine at
-tp P and a decode engine at -tp D on Ray (CPU ranks, gloo, float64), over tcp, for Qwen3-MoE (GQA: 2 kv heads, one
per TP rank) and DeepSeek-V3 (MLA: the latent whole on every rank, saved once):
- (P, D) = (2, 1): the decode rank takes each head from the prefill rank holding it (two fetches);
- (1, 2): each decode rank takes its head cut out of the one prefill rank's rows;
- (2, 2): rank to rank;
with EP beside TP on one side of each model (Qwen3's decode engine and DeepSeek-V3's prefill engine at `-tp 2 -ep 2`:
the experts in EP over the group, its attention heads still split); and Qwen3-Next (hybrid: its linear-attention
states rank to rank) at (2, 2). Greedy tokens equal one engine's, the decode side computes only each prompt's last
token (cached = prompt - 1), and every block (and state slot) is free on both sides after. One engine start per
side and TP size per model, shared by its pairs; the plans and claims for other head counts (K < tp: replicated
heads), a prefill rank's server, the joined reports and the refusals without engines.
"""
from __future__ import annotations


import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.contract.kv_transfer_params import KVTransferParams
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
from moelink.engine.kv_transfer.tp_shard import (Heads, ShardAsk, needed_ranks, parse_key, plan_fetches, rank_heads,
                                                 save_token, token_tp_size)

from tests.helpers import hf_checkpoints
from tests.helpers.net import free_port
from tests.helpers.parity import prompts
from tests.helpers.tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.slow

KW = dict(dtype="float64", num_kv_blocks=48, block_size=4, max_num_batched_tokens=32, max_model_len=64,
          skip_warmup=True)
NEW = 4
PAIRS = [(2, 1), (1, 2), (2, 2)]
SAVE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                      kv_transfer_params=KVTransferParams(do_remote_decode=True))


def _engines(path, ep: str):
    """{("prefill" | "decode", tp): LLM}: the four engines of one model's pairs; the `ep` side's TP 2 engine runs its
    experts in EP 2 over the group (`-tp 2 -ep 2`), the other's split by TP."""
    out = {}
    try:
        for tp in (1, 2):
            port = free_port(tp)
            eps = {side: 2 if tp == 2 and side == ep else 1 for side in ("prefill", "decode")}
            out["prefill", tp] = LLM(path, tensor_parallel_size=tp, expert_parallel_size=eps["prefill"],
                                     kv_connector=RemoteKVConnector(RemoteKVConfig(transport="tcp", port=port,
                                                                                   num_ranks=tp)), **KW)
            out["decode", tp] = LLM(path, tensor_parallel_size=tp, expert_parallel_size=eps["decode"],
                                    kv_connector=RemoteKVConnector(RemoteKVConfig(transport="tcp")), **KW)
    except BaseException:
        _shutdown(out)
        raise
    return out


def _shutdown(engines) -> None:
    for llm in engines.values():
        llm.engine.shutdown()


def _all_free(llm) -> None:
    assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    for sched in llm.engine.schedulers:  # a hybrid model's state slots too
        slots = getattr(sched.kv, "slots", None)
        assert slots is None or slots.num_free == slots.num_slots


def _check_pairs(engines, ps, pairs=PAIRS, reference=("prefill", 1)) -> None:
    """Each pair (P, D) of `pairs` against the greedy tokens of one engine (`engines[reference]`, no handoff)."""
    plain = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in engines[reference].generate(ps, plain, use_tqdm=False)]
    for p, d in pairs:
        pre, dec = engines["prefill", p], engines["decode", d]
        saved = pre.generate(ps, SAVE, use_tqdm=False)
        params = [o.kv_transfer_params for o in saved]  # None for a one-token prompt: nothing to move
        assert all(k is None or (k.remote_ranks == p and token_tp_size(k.remote_kv_token) == p) for k in params)
        outs = dec.generate(ps, [SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True,
                                                kv_transfer_params=k) for k in params], use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want, (p, d)
        assert [o.num_cached_tokens for o in outs] == [len(x) - 1 for x in ps], (p, d)  # every prompt loaded
        if d == 1:  # in this process: its worker half's counters (one fetch per prefill rank holding its heads)
            stats = dec.engine.executor.runner.plugin("kv_transfer").connector.stats
            assert stats.num_failed == 0 and stats.num_loaded == len(ps) * pairs.count((p, 1)), (p, d)
        pre.engine.step()  # the save reports of the group's last rank, if they came after the request ended
        _all_free(pre)
        _all_free(dec)


def test_qwen3_gqa_heads_between_tp_sizes(local_ray, tiny_model):
    name = "qwen3_e6k3"  # 4 q heads, 2 kv heads: one per rank at -tp 2
    path = tiny_model(name)
    engines = _engines(path, ep="decode")
    try:
        _check_pairs(engines, prompts(TINY_CONFIGS[name]["vocab_size"], seed=46, n=3, lo=5, hi=20))
    finally:
        _shutdown(engines)


def test_deepseek_v3_latent_between_tp_sizes(local_ray, hf_tiny_model):
    path = hf_tiny_model("dsv3_lora")  # MLA: the latent whole on every rank, saved by the group's first only
    engines = _engines(path, ep="prefill")
    try:
        _check_pairs(engines, prompts(hf_checkpoints.VOCAB, seed=47, n=3, lo=5, hi=20))
    finally:
        _shutdown(engines)


def test_qwen3_next_states_rank_to_rank_at_tp2(local_ray, hf_tiny_model):
    """A hybrid model (gated DeltaNet beside full attention) at -tp 2 on both sides: each decode rank takes its
    place's full-attention heads and linear-attention states (its own heads', not cut) from the prefill rank of the
    same place. A one-token prompt among them (nothing to move: decoded from a zeroed state slot on an engine that
    ran other requests before, engine/state/cache.StatePlan.fresh_decodes)."""
    path = hf_tiny_model("qwen3_next")
    ps = prompts(hf_checkpoints.VOCAB, seed=48, n=3, lo=2, hi=20) + [[7]]
    engines = {}
    try:
        port = free_port(2)
        engines["prefill", 2] = LLM(path, tensor_parallel_size=2, kv_connector=RemoteKVConnector(
            RemoteKVConfig(transport="tcp", port=port, num_ranks=2)), **KW)
        engines["decode", 2] = LLM(path, tensor_parallel_size=2,
                                   kv_connector=RemoteKVConnector(RemoteKVConfig(transport="tcp")), **KW)
        # The reference: the decode engine without a handoff (TP 2 equals one rank: tests/ep/test_tp_families.py).
        _check_pairs(engines, ps, pairs=[(2, 2)], reference=("decode", 2))
    finally:
        _shutdown(engines)


def test_prefill_of_two_tp_groups_to_a_decode_rank_without_tp(local_ray, tiny_model):
    """A prefill engine at -tp 2 -ep 4 (two TP groups, DP attention): each output names its group's two ports
    (port + 2g, remote_ranks 2), and a decode engine without TP takes each head from the rank of that group
    holding it."""
    name = "qwen3_e6k3"
    path = tiny_model(name)
    ps = prompts(TINY_CONFIGS[name]["vocab_size"], seed=49, n=4, lo=5, hi=20)
    port = free_port(4)
    engines = {}
    try:
        engines["decode", 1] = LLM(path, kv_connector=RemoteKVConnector(RemoteKVConfig(transport="tcp")), **KW)
        engines["prefill", 2] = LLM(path, tensor_parallel_size=2, expert_parallel_size=4, kv_connector=RemoteKVConnector(
            RemoteKVConfig(transport="tcp", port=port, num_ranks=4)), **KW)
        saved = engines["prefill", 2].generate(ps, SAVE, use_tqdm=False)
        assert {o.kv_transfer_params.remote_port for o in saved} == {port, port + 2}  # both groups saved some
        _check_pairs(engines, ps, pairs=[(2, 1)], reference=("decode", 1))  # the decode engine without a handoff
    finally:
        _shutdown(engines)


# ---------------------------------------------------------------- the head maps, for other head counts
@pytest.mark.parametrize("heads", [1, 2, 4, 8])
@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 2), (2, 1), (2, 4), (4, 2), (4, 4), (8, 2), (1, 8)])
def test_every_decode_head_comes_from_exactly_one_prefill_rank(heads, prefill_tp, decode_tp):
    """Each decode rank's fetches cover its heads once, each from the first prefill rank holding them (a replicated
    head, K < tp, is saved and read once), and every prefill rank's entry is dropped exactly when the decode ranks
    that take from it all have."""
    takers: dict[int, set[int]] = {}
    for d in range(decode_tp):
        mine = rank_heads(d, decode_tp, heads)
        got = []
        for p, ask in plan_fetches(mine, d, decode_tp, prefill_tp):
            held = rank_heads(p, prefill_tp, heads)
            assert ask.heads.overlap(held) == ask.heads and ask.heads.overlap(mine) == ask.heads
            got += range(ask.heads.start, ask.heads.start + ask.heads.count)
            takers.setdefault(p, set()).add(d)
            assert d in needed_ranks(held, ask)
        assert got == list(range(mine.start, mine.start + mine.count))
    for p, ds in takers.items():
        assert needed_ranks(rank_heads(p, prefill_tp, heads), ShardAsk(Heads(0, 1, heads), 0, decode_tp)) == ds


def test_the_latent_is_asked_of_one_prefill_rank_by_every_decode_rank():
    plans = [plan_fetches(None, d, 4, 2) for d in range(4)]
    assert all(plan == [(0, ShardAsk(None, d, 4))] for d, plan in enumerate(plans))
    assert needed_ranks(None, plans[0][0][1]) == frozenset(range(4))


def test_the_key_carries_the_ask_and_the_token_the_prefill_tp():
    token = save_token("A" * 22, 2)
    assert token_tp_size(token) == 2 and token_tp_size("A" * 22) == 1 and token_tp_size("B" * 40) == 1
    ask = ShardAsk(Heads(1, 1, 2), 1, 2)
    assert parse_key(ask.key(token)) == (token, ask)
    assert parse_key(ShardAsk(None, 0, 2).key(token)) == (token, ShardAsk(None, 0, 2))
    assert parse_key(token) == (token, None)
    with pytest.raises(ValueError, match="not one"):
        parse_key(token + ".1.2.2.0.2")  # heads 1-2 of 2


# ---------------------------------------------------------------- what stays refused under TP, by name (no engine)
def test_other_connectors_are_refused_under_tp_and_the_remote_one_bound(tiny_model, hf_tiny_model):
    from moelink.engine.config.engine_args import EngineArgs
    from moelink.engine.kv_transfer.inhost import InHostKVConnector, InHostKVStore

    with pytest.raises(ValueError, match="kv_connector=InHostKVConnector is not supported with tensor_parallel_size=2"):
        EngineArgs(model=tiny_model("qwen3_e6k3"), tensor_parallel_size=2, load_format="dummy",
                   kv_connector=InHostKVConnector(InHostKVStore())).create_engine_config()
    for name, heads, states in (("qwen3_e6k3", 2, False), ("qwen3_next", 2, True), ("dsv3_lora", 0, False)):
        path = tiny_model(name) if name in TINY_CONFIGS else hf_tiny_model(name)
        cfg = EngineArgs(model=path, tensor_parallel_size=2, load_format="dummy",
                         kv_connector=RemoteKVConnector(RemoteKVConfig(transport="tcp"))).create_engine_config()
        shard = cfg.kv_connector.shard
        assert (shard.tp_size, shard.num_kv_heads, shard.states) == (2, heads, states), name
    # `moelink serve -tp 2 --role prefill` names its EP size (1) as the ranks serving: raised to the world (2).
    cfg = EngineArgs(model=tiny_model("qwen3_e6k3"), tensor_parallel_size=2, load_format="dummy",
                     kv_connector=RemoteKVConnector(RemoteKVConfig(transport="tcp", port=5600))).create_engine_config()
    assert cfg.kv_connector.config.num_ranks == 2


def test_a_hybrid_models_states_move_only_between_engines_of_one_tp_size():
    assert plan_fetches(Heads(1, 1, 2), 1, 2, 2, states=True) == [(1, ShardAsk(Heads(1, 1, 2), 1, 2))]
    with pytest.raises(ValueError, match="decode engine runs tensor_parallel_size=2, the prefill engine 1"):
        plan_fetches(Heads(1, 1, 2), 1, 2, 1, states=True)


def test_decode_params_refuses_several_tp_groups():
    conn = RemoteKVConnector(RemoteKVConfig(transport="tcp", port=5600, num_ranks=4))
    saved = KVTransferParams(do_remote_prefill=True, remote_host="127.0.0.1", remote_port=5602, remote_ranks=2,
                             remote_kv_token=save_token("A" * 22, 2))
    with pytest.raises(ValueError, match="num_ranks=4 names more than one TP group of 2 ranks"):
        conn.decode_params(saved)
    one_group = RemoteKVConnector(RemoteKVConfig(transport="tcp", port=5600, num_ranks=2)).decode_params(saved)
    assert (one_group.remote_port, one_group.remote_ranks) == (5600, 2)


def test_a_transfer_is_reported_once_every_rank_of_the_group_has_it():
    """tp_join.py: the first rank reports a transfer only when the other rank has sent it too, failed if either
    failed; a report sent twice counts once."""
    import secrets
    import time

    from moelink.engine.kv_transfer.tp_join import TPJoin

    name = secrets.token_hex(8)
    first, second = TPJoin(name, 0, 2), TPJoin(name, 1, 2)
    try:
        assert first.join({1: True, 2: True}) is None  # the second rank has reported neither
        assert second.join({1: True, 2: False}) == {1: True, 2: False}  # its own, which the executor drops
        second.join({1: True})  # sent again (a cut send retried): counts once
        got, deadline = {}, time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            got.update(first.join(None) or {})
            time.sleep(0.01)
        assert got == {1: True, 2: False}
        assert first.join({3: True}) is None
    finally:
        second.close()
        first.close()


def test_a_regrouped_first_rank_binds_the_name_its_predecessor_held():
    """After an elastic regroup a rebuilt group's first rank binds the join name the previous one held: at once
    after that one closed (close waits for its accept thread), and, while a predecessor still holds it (a killed
    rank still exiting), as soon as it lets go, within TPJoin.BIND_WAIT_S."""
    import secrets
    import threading
    import time

    from moelink.engine.kv_transfer.tp_join import TPJoin

    name = secrets.token_hex(8)
    TPJoin(name, 0, 2).close()
    again = TPJoin(name, 0, 2)  # closed just now: free
    threading.Timer(0.3, again.close).start()  # held for 0.3 s more, as by a rank still exiting
    t0 = time.monotonic()
    third = TPJoin(name, 0, 2)
    try:
        assert 0.2 < time.monotonic() - t0 < TPJoin.BIND_WAIT_S
    finally:
        third.close()


def test_a_prefill_rank_serves_each_decode_rank_its_heads_once(tmp_path):
    """The server side of a shard ask over tcp, no engine: a prefill rank holding kv heads 0-1 of 2 answers decode
    rank d of 2 with head d only (its rows cut out of the saved ones), once per decode rank, and drops the entry when
    both have taken theirs; heads it does not hold are refused by name."""
    import torch

    from moelink.engine.contract.kv_blocks import SavedKV
    from moelink.engine.kv_transfer.store import SavedKVStore
    from moelink.engine.kv_transfer.transport import make_transport
    from moelink.engine.kv_transfer.tp_shard import with_heads
    from moelink.engine.kv_transfer.wire import KVFetchError

    layout = (("full", (("torch.float32", (4, 2, 8)), ("torch.float32", (4, 2, 8)))),)  # k, v: [B, H, D] rows
    rows = tuple(torch.randint(0, 256, (3, 4, 2, 32), dtype=torch.uint8) for _ in range(2))  # 3 blocks, bytes
    tokens, token = tuple(range(12)), save_token("C" * 22, 2)
    store = SavedKVStore(60.0, 1 << 20)
    store.heads = Heads(0, 2, 2)
    store.put(token, SavedKV(12, tokens, layout, [([0, 1, 2], rows)]))
    tr = make_transport("tcp", 2.0, 10.0)
    port = free_port(1)
    server = tr.serve(store, "127.0.0.1", port)

    def fetch(ask: ShardAsk):
        return tr.fetch("127.0.0.1", port, ask.key(token), with_heads(layout, ask.heads.count), list(tokens), 3,
                        10.0, torch.device("cpu"))

    try:
        with pytest.raises(KVFetchError, match="holds kv heads 0-1 of 2, not 0-0 of 4"):
            fetch(ShardAsk(Heads(0, 1, 4), 0, 4))
        for d in (1, 0):
            got = fetch(ShardAsk(Heads(d, 1, 2), d, 2))
            assert all(torch.equal(g, r[:, :, d:d + 1]) for g, r in zip(got.groups[0][1], rows))
            assert len(store) == d  # dropped once both decode ranks have taken their head
        with pytest.raises(KVFetchError, match="no KV for this key"):
            fetch(ShardAsk(Heads(0, 1, 2), 0, 2))
        assert store.counters.num_served == 1
    finally:
        server.close()


def test_deepseek_v4_rank_to_rank_at_tp2(local_ray, tmp_path_factory):
    """DeepSeek-V4 at -tp 2 on both sides: its one shared KV head, compressed entries and index keys are whole on
    every rank (saved by the group's first rank, read by each decode rank), its window states rank to rank."""
    from tests.helpers.dsv4_checkpoint import dsv4_config, save_dsv4_checkpoint

    path = save_dsv4_checkpoint(tmp_path_factory.mktemp("dsv4_tp_pd"))
    ps = prompts(dsv4_config().vocab_size, seed=49, n=3, lo=5, hi=40)
    kw = {**KW, "block_size": 16, "num_kv_blocks": 32, "max_model_len": 128}  # a multiple of V4's compress rates
    engines = {}
    try:
        engines["prefill", 2] = LLM(path, tensor_parallel_size=2, kv_connector=RemoteKVConnector(
            RemoteKVConfig(transport="tcp", port=free_port(2), num_ranks=2)), **kw)
        engines["decode", 2] = LLM(path, tensor_parallel_size=2,
                                   kv_connector=RemoteKVConnector(RemoteKVConfig(transport="tcp")), **kw)
        _check_pairs(engines, ps, pairs=[(2, 2)], reference=("decode", 2))
    finally:
        _shutdown(engines)
