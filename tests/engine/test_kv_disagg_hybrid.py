"""Prefill/decode disaggregation of a hybrid model (Qwen3-Next: gated DeltaNet beside full attention, issue 42):
each linear-attention layer's conv and recurrent state travels beside the full-attention layers' KV blocks, as
typed "state" groups of the wire layout (engine/contract/kv_blocks.py, wire VERSION 3), and the decode engine's
slot takes it (scheduler/kv_connector.py: both sides move the prompt's first n - 1 tokens).

Both engines run here (the remote connector over TCP or shared memory, as across processes):
- greedy tokens equal one engine's, the decode engine computes only each prompt's last token (its cached tokens
  are prompt - 1), and both engines end with every block and every state slot free;
- a stream cut mid-reply: the decode engine frees what the load held, recomputes, and still equals one engine's;
  both engines end with every block and state slot free.
"""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer import tcp as kv_tcp
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
from moelink.engine.contract.kv_transfer_params import KVTransferParams
from moelink.engine.contract.kv_blocks import STATE

from tests.helpers.hf_checkpoints import VOCAB
from tests.helpers.kv_disagg import KW, MAX_NEW, Decoder
from tests.helpers.net import free_port
from tests.helpers.parity import prompts

SAVE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                      kv_transfer_params=KVTransferParams(do_remote_decode=True))


@pytest.fixture(scope="module")
def case(hf_tiny_model):
    """(checkpoint, prompts: 1 token, 40 tokens (chunked by the 32-token budget), and between, one engine's
    greedy outputs)."""
    path = hf_tiny_model("qwen3_next")
    ps = prompts(VOCAB, seed=23, n=5, lo=1, hi=40)
    with LLM(path, **KW) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(
            ps, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)]
    return path, ps, want


def _decode_params(outs) -> list[SamplingParams]:
    """Each prefill output's kv_transfer_params (None for a one-token prompt: nothing saved, computed there)."""
    return [SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                           kv_transfer_params=o.kv_transfer_params) for o in outs]


def _all_free(llm) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    sched = llm.engine.schedulers[0]
    assert sched.kv.slots.num_free == sched.kv.slots.num_slots  # every state slot back
    sched.check_invariants()


def _prefill(path, ps, transport: str):
    conn = RemoteKVConnector(RemoteKVConfig(port=free_port(), transport=transport))
    pre = LLM(path, kv_connector=conn, **KW)
    outs = pre.generate(ps, SAVE, use_tqdm=False)
    return pre, outs


@pytest.mark.parametrize("transport", ["tcp", "shm", "nixl"])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_state_travels_with_the_kv_and_decode_equals_one_engine(case, transport):
    path, ps, want = case
    pre, outs = _prefill(path, ps, transport)
    dec = None
    try:
        assert [o.outputs[0].token_ids for o in outs] == [w[:1] for w in want]
        assert [o.kv_transfer_params is None for o in outs] == [len(p) == 1 for p in ps]
        store = pre.engine.executor.runner.plugin("kv_transfer").connector.store
        saved = store.peek(outs[1].kv_transfer_params.remote_kv_token)  # the 40-token prompt
        kinds = [kind for kind, _ in saved.layout]
        assert kinds.count(STATE) == 3 and kinds.count("full") == 2  # 3 linear layers' states, 2 full layers' KV
        assert saved.num_tokens == len(ps[1]) - 1
        _all_free(pre)
        dec = Decoder(path, RemoteKVConfig(transport=transport))
        dec.add(ps, _decode_params(outs))
        got, cached = {}, {}
        while dec.llm.engine.has_requests():
            for o in dec.llm.engine.step():
                if o.finished:
                    got[o.request_id], cached[o.request_id] = o.outputs[0].token_ids, o.num_cached_tokens
        assert [got[f"d{i}"] for i in range(len(ps))] == want
        assert [cached[f"d{i}"] for i in range(len(ps))] == [len(p) - 1 for p in ps]
        assert dec.computed == len(ps) * MAX_NEW  # each prompt's last token, then MAX_NEW - 1 decode steps
        stats = dec.worker.stats
        moved = sum(len(p) > 1 for p in ps)  # a one-token prompt moves nothing: the decode side computes it
        assert stats.num_loaded == moved and stats.num_failed == 0
        _all_free(dec.llm)
    finally:
        if dec is not None:
            dec.close()
        pre.engine.shutdown()


def test_a_cut_stream_frees_every_block_and_slot_and_recomputes(case, monkeypatch):
    """The prefill server sends a reply's header and half of its first tensor, then closes the connection."""
    from moelink.engine.kv_transfer.wire import saved_header, send_header

    def cut(sock, saved, query=None, deadline=None):
        send_header(sock, saved_header(saved))
        first = saved.groups[0][1][0].contiguous().numpy().tobytes()
        sock.sendall(first[:len(first) // 2])  # the server closes the socket after its reply

    monkeypatch.setattr(kv_tcp, "send_saved", cut)
    path, ps, want = case
    pre, outs = _prefill(path, ps, "tcp")
    dec = None
    try:
        dec = Decoder(path, RemoteKVConfig(fetch_timeout_s=30.0, transport="tcp"))
        dec.add(ps, _decode_params(outs))
        assert dec.run(len(ps)) == want
        stats = dec.worker.stats
        moved = sum(len(p) > 1 for p in ps)
        assert stats.num_failed == moved and stats.num_loaded == 0
        assert all("closed" in reason or "reset" in reason for _, reason in stats.failures), list(stats.failures)
        assert dec.computed == sum(map(len, ps)) + len(ps) * (MAX_NEW - 1)  # every prompt computed here
        _all_free(dec.llm)
        _all_free(pre)
    finally:
        if dec is not None:
            dec.close()
        pre.engine.shutdown()


def test_a_prompt_the_prefill_engine_has_cached_to_its_save_point_still_moves_the_right_state(case):
    """n - 1 = 12 on a block boundary (blocks of 4) with a state checkpoint there after the first prefill: the
    second prefill of the same prompt does not resume from it (no step would end at the save point) and its
    handoff decodes as one engine."""
    path, _, _ = case
    p = prompts(VOCAB, seed=29, n=2, lo=13, hi=13)[0]
    with LLM(path, **KW) as one:
        want = one.generate([p], SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids
    pre, first = _prefill(path, [p], "tcp")
    dec = None
    try:
        second = pre.generate([p], SAVE, use_tqdm=False)
        # The checkpoint at 12 was found (the manager counts it) and not used (no token counted as a hit).
        assert pre.engine.schedulers[0].kv.ckpts.num_hits == 1 and pre.engine.stats().prefix_cache_hits == 0
        dec = Decoder(path, RemoteKVConfig(transport="tcp"))
        dec.add([p, p], _decode_params(first + second))
        assert dec.run(2) == [want, want]
        assert dec.worker.stats.num_loaded == 2 and dec.computed == 2 * MAX_NEW
        _all_free(dec.llm)
        _all_free(pre)
    finally:
        if dec is not None:
            dec.close()
        pre.engine.shutdown()
