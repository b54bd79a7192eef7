"""Prefill/decode disaggregation across processes over TCP (engine/kv_transfer/remote.py): a prefill engine in a
process this test starts (tests/helpers/kv_prefill_process.py, on 127.0.0.1) prefills each prompt with
max_tokens=1 and serves the saved KV; an engine here fetches it by the prefill request's id, decodes, and its
greedy outputs equal one engine's that did everything, for GQA (Qwen3-MoE), MLA (DeepSeek-V3) and gpt-oss
(sliding window on shared tensors). Faults: the prefill process killed before the fetch, or in the middle of
one, or a fetch that runs past its deadline: the request is recomputed, its reason kept, and every KV block is
back in the pool. float64, as in test_kv_connector_engine.py (the decode engine computes the last prompt token
alone)."""
from __future__ import annotations

import os

import pytest

from moelink.engine.kv_transfer.remote import RemoteKVConfig
from moelink.scheduler.request import RequestStatus

from tests.helpers.gpt_oss_checkpoints import save_gpt_oss
from tests.helpers.kv_disagg import KW, MAX_NEW, READY_S, Decoder, PrefillProcess, decode_params, one_engine
from tests.helpers.net import free_port, listening
from tests.helpers.parity import prompts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("heap_held_frozen")]  # a prefill engine in a subprocess


@pytest.fixture(scope="module")
def gpt_oss_paired(tmp_path_factory):
    return save_gpt_oss(tmp_path_factory.mktemp("kv_gpt_oss"), num_hidden_layers=2)


def _path(kind, tiny_model, hf_tiny_model, gpt_oss_paired):
    return {"gqa": lambda: tiny_model("qwen3_e6k3"), "mla": lambda: hf_tiny_model("dsv3_lora"),
            "sliding": lambda: gpt_oss_paired}[kind]()


@pytest.mark.parametrize("kind", ["gqa", "mla", "sliding"])
def test_prefill_in_another_process_decode_here(kind, tiny_model, hf_tiny_model, gpt_oss_paired):
    path = _path(kind, tiny_model, hf_tiny_model, gpt_oss_paired)
    ps = prompts(200, seed=3, n=4, lo=5, hi=23)  # one block and a bit, up to six blocks; partial last blocks
    want = one_engine(path, ps)
    port = free_port()
    pre = PrefillProcess({"model": path, "port": port, "prompts": ps, "llm": KW})
    try:
        ready = pre.expect("ready", READY_S)
        assert ready["first"] == [w[:1] for w in want]
        assert listening(port, pids=[pre.pid]) == {("127.0.0.1", port)}  # only where asked
        dec = Decoder(path)
        try:
            dec.add(ps, decode_params(ready["params"]))
            got = dec.run(len(ps))
            assert got == want
            # Only each prompt's last token computed here, then the decode steps: no prompt was recomputed.
            assert dec.computed == len(ps) * MAX_NEW
            stats = dec.worker.stats
            assert stats.num_loaded == len(ps) and stats.num_failed == 0 and stats.bytes_loaded > 0
            assert dec.free_blocks()[0] == dec.free_blocks()[1]
        finally:
            dec.close()
        closed = pre.close()
        # Fetched once each, then dropped: the prefill side holds nothing.
        assert closed["store"]["num_saved"] == len(ps) and closed["store"]["num_served"] == len(ps)
        assert closed["store"]["held"] == 0
    finally:
        pre.close()


def test_prefill_in_another_process_over_shared_memory(tiny_model):
    from moelink.engine.kv_transfer.shm import unix_socket_path

    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=14, n=4, lo=5, hi=23)
    want = one_engine(path, ps)
    port = free_port()
    pre = PrefillProcess({"model": path, "port": port, "prompts": ps, "llm": KW, "transport": "shm"})
    try:
        ready = pre.expect("ready", READY_S)
        assert not listening(pids=[pre.pid])  # no TCP port at all: a Unix socket of this user's
        dec = Decoder(path, RemoteKVConfig(transport="shm"))
        try:
            dec.add(ps, decode_params(ready["params"]))
            assert dec.run(len(ps)) == want
            assert dec.worker.stats.num_loaded == len(ps) and dec.computed == len(ps) * MAX_NEW
            assert dec.free_blocks()[0] == dec.free_blocks()[1]
        finally:
            dec.close()
        closed = pre.close()
        assert closed["store"]["num_served"] == len(ps) and closed["store"]["held"] == 0
        assert not os.path.exists(unix_socket_path("127.0.0.1", port))  # removed at shutdown
    finally:
        pre.close()


def test_prefill_killed_before_the_fetch_recomputes(tiny_model):
    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=8, n=3, lo=6, hi=14)
    want = one_engine(path, ps)
    pre = PrefillProcess({"model": path, "port": free_port(), "prompts": ps, "llm": KW})
    try:
        params = decode_params(pre.expect("ready", READY_S)["params"])
        pre.kill()
        dec = Decoder(path)
        try:
            dec.add(ps, params)
            assert dec.run(len(ps)) == want
            assert dec.worker.stats.num_failed == len(ps) and dec.worker.stats.num_loaded == 0
            assert all("refused" in reason.lower() for _, reason in dec.worker.stats.failures)
            assert dec.computed == sum(map(len, ps)) + len(ps) * (MAX_NEW - 1)  # every prompt computed here
            assert dec.free_blocks()[0] == dec.free_blocks()[1]
        finally:
            dec.close()
    finally:
        pre.close()


@pytest.mark.parametrize("fault", ["killed", "deadline"])
def test_fetch_cut_off_midway_frees_the_blocks_and_recomputes(fault, tiny_model):
    """The prefill server sends a reply's header and half a tensor, then stops: killed there ("killed"), or left
    silent past the decode side's fetch_timeout_s ("deadline")."""
    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=9, n=2, lo=9, hi=17)
    want = one_engine(path, ps)
    pre = PrefillProcess({"model": path, "port": free_port(), "prompts": ps, "llm": KW, "stall": True,
                          "transport": "tcp"})
    try:
        params = decode_params(pre.expect("ready", READY_S)["params"])
        timeout = 2.0 if fault == "deadline" else 120.0
        dec = Decoder(path, RemoteKVConfig(fetch_timeout_s=timeout, transport="tcp"))
        try:
            free, total = dec.free_blocks()
            assert free == total
            dec.add(ps, params)
            dec.llm.engine.step()  # schedules the loads: the blocks are reserved, the fetches start
            sched = dec.llm.engine.schedulers[0]
            assert all(r.status is RequestStatus.WAITING_FOR_KV for r in sched.requests.values())
            pre.expect("stalled", 60.0)  # a fetch is mid-reply
            assert dec.free_blocks()[0] < total  # reserved on arrival, held while loading
            if fault == "killed":
                pre.kill()
            assert dec.run(len(ps)) == want
            stats = dec.worker.stats
            assert stats.num_failed == len(ps) and stats.num_loaded == 0
            words = ("timed out",) if fault == "deadline" else ("closed", "reset")  # EOF, or an RST
            assert all(any(w in reason for w in words) for _, reason in stats.failures), list(stats.failures)
            assert dec.computed == sum(map(len, ps)) + len(ps) * (MAX_NEW - 1)
            assert dec.free_blocks() == (total, total)
            sched.check_invariants()
        finally:
            dec.close()
    finally:
        pre.kill() if pre.proc.poll() is None else None
        pre.close()


def test_prefill_in_another_process_over_a_collective_group(tiny_model):
    """The "collective" transport: the exchange on the TCP socket, the bytes over a gloo pair group (NCCL on GPU
    ranks); the group is made by the first fetch and reused by the rest."""
    from moelink.engine.kv_transfer import collective as kv_collective

    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=15, n=4, lo=5, hi=23)
    want = one_engine(path, ps)
    port = free_port()
    pre = PrefillProcess({"model": path, "port": port, "prompts": ps, "llm": KW, "transport": "collective"})
    try:
        ready = pre.expect("ready", READY_S)
        dec = Decoder(path, RemoteKVConfig(transport="collective"))
        try:
            dec.add(ps, decode_params(ready["params"]))
            assert dec.run(len(ps)) == want
            assert dec.worker.stats.num_loaded == len(ps) and dec.computed == len(ps) * MAX_NEW
            assert dec.free_blocks()[0] == dec.free_blocks()[1]
            pair = kv_collective._client_pairs.get(("127.0.0.1", port))  # one group with that prefill rank, reused
            assert pair is not None and pair.group is not None
        finally:
            dec.close()
        closed = pre.close()
        assert closed["store"]["num_served"] == len(ps) and closed["store"]["held"] == 0
    finally:
        pre.close()


def test_collective_fetch_from_a_killed_prefill_process_recomputes(tiny_model):
    from moelink.engine.kv_transfer import collective as kv_collective

    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=16, n=2, lo=6, hi=14)
    want = one_engine(path, ps)
    pre = PrefillProcess({"model": path, "port": free_port(), "prompts": ps, "llm": KW, "transport": "collective"})
    try:
        params = decode_params(pre.expect("ready", READY_S)["params"])
        pre.kill()
        dec = Decoder(path, RemoteKVConfig(transport="collective", fetch_timeout_s=20.0))
        try:
            dec.add(ps, params)
            assert dec.run(len(ps)) == want
            assert dec.worker.stats.num_failed == len(ps) and dec.worker.stats.num_loaded == 0
            assert dec.free_blocks()[0] == dec.free_blocks()[1]
            assert kv_collective._client_pairs.get(("127.0.0.1", params[0].kv_transfer_params.remote_port)) is None
        finally:
            dec.close()
    finally:
        pre.close()
