"""Online EPLB on Ray (CPU ranks, gloo): a router bias sends half of all (token, expert) pairs to experts 4 and 5
(both on rank 2); the engine re-places experts while serving, moves the weights between ranks a layer per step
boundary, and switches together. Greedy float64 outputs equal one rank's; the measured max/mean load per rank
falls to what EPLB predicted; the longest inter-step move chunk is printed and bounded."""
from __future__ import annotations

import random

import pytest

from moelink.engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

HOT = [4, 5]  # both on rank 2; the default redundant slots copy experts 0..3, not these
ENGINE_KW = dict(dtype="float64", max_num_seqs=8, max_num_batched_tokens=48, num_kv_blocks=128, block_size=16)
MOVE_CHUNK_BOUND_S = 5.0  # one layer's changed experts between two steps (tiny model, CPU, gloo)


@pytest.fixture(scope="module")
def skewed_model(tmp_path_factory):
    """A tiny DeepSeek-V3 (2 MoE layers, 8 experts, top-4) whose router bias always selects experts 4 and 5."""
    from safetensors.torch import load_file, save_file

    from moelink.engine.tools.tiny_model import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("dsv3_skew"), "deepseek_v3", num_layers=3, num_experts=8,
                           top_k=4, max_position_embeddings=512, extra=dict(n_group=1, topk_group=1))
    f = path / "model.safetensors"
    sd = load_file(f)
    biases = [k for k in sd if k.endswith("e_score_correction_bias")]
    assert len(biases) == 2
    for k in biases:
        sd[k] = sd[k].clone()
        sd[k][HOT] += 100.0  # selection only: the routed weights still come from the gate scores
    save_file(sd, f, metadata={"format": "pt"})
    return str(path)


def _greedy(llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _prompts(seed: int, n: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(500) for _ in range(rng.randint(4, hi))] for _ in range(n)]


# Each test's prompts: the parametrized cases' (seeded by the EP size) and the kill test's.
PROMPTS = {2: _prompts(2, 16, 40), 4: _prompts(4, 16, 40), "kill": _prompts(18, 20, 30)}


@pytest.fixture(scope="module")
def one_rank(skewed_model):
    """Every test's prompts on one in-process rank, in one run: {tuple(prompt): greedy tokens} (float64 greedy
    outputs depend neither on the batch around a request nor on when it arrived)."""
    every = [p for ps in PROMPTS.values() for p in ps]
    # All of them in one batch: a few steps instead of a few hundred (the outputs do not depend on it).
    kw = dict(ENGINE_KW, max_num_seqs=len(every), max_num_batched_tokens=2048, num_kv_blocks=512)
    with LLM(skewed_model, **kw) as llm:
        return {tuple(p): out for p, out in zip(every, _greedy(llm, every))}


# EP 2 without redundant slots (EPLB can only repack: 4 and 5 to different ranks); EP 4 with 4 (copies of 4, 5).
@pytest.mark.parametrize("ep,redundant", [(2, 0), (4, 4)])
def test_online_eplb_balances_skewed_load_outputs_unchanged(local_ray, skewed_model, one_rank, ep, redundant):
    prompts = PROMPTS[ep]
    want = [one_rank[tuple(p)] for p in prompts]
    llm = LLM(skewed_model, expert_parallel_size=ep, num_redundant_experts=redundant, eplb_interval=4, **ENGINE_KW)
    try:
        got = _greedy(llm, prompts)
        load = llm.engine.expert_load()
    finally:
        llm.engine.shutdown()
    assert got == want  # token-identical across the rebalance
    m = load.eplb
    print(f"\nEPLB EP {ep}: {m}")
    total = sum(map(sum, load.tokens_per_expert_LG))
    assert sum(sum(row[e] for e in HOT) for row in load.tokens_per_expert_LG) == total // 2  # the skew
    assert m["rebalances"] >= 1 and m["bytes_moved"] > 0
    first = m["history"][0]  # the move away from the default placement
    assert first["bytes_moved"] > 0
    assert first["predicted_imbalance_before"] > 1.3 and first["predicted_imbalance_after"] < 1.1
    # Measured (pairs each rank's experts computed) agrees with the prediction, before and after the move.
    assert first["measured_imbalance_before"] == pytest.approx(first["predicted_imbalance_before"], abs=0.1)
    assert first["measured_imbalance_after"] == pytest.approx(first["predicted_imbalance_after"], abs=0.15)
    assert first["measured_imbalance_after"] < first["measured_imbalance_before"] - 0.25
    print(f"longest inter-step move chunk: {m['longest_move_chunk_s'] * 1e3:.1f} ms, "
          f"commit {m['commit_s'] * 1e3:.1f} ms")
    assert m["longest_move_chunk_s"] < MOVE_CHUNK_BOUND_S
    # The report shows the current placement: the hot experts hold copies on several ranks now.
    for layer in load.experts_on_ranks_per_layer:
        if redundant:
            assert all(sum(e in held for held in layer) >= 2 for e in HOT)
        else:
            assert not any(HOT[0] in held and HOT[1] in held for held in layer)


def test_rank_killed_during_an_expert_move_every_request_completes(local_ray, skewed_model, one_rank):
    """Elastic EP 4 with online EPLB: SIGKILL a rank while a move chunk is in flight (seen from the controller's
    state; the chunks are slowed by a test-only knob so the kill lands inside one). Every request completes,
    greedy outputs as undisturbed, readiness never turns, no KV block leaks, and the survivors' placement
    state is whole: every layer's tables are its placement's, the same layout on every survivor and in the
    controller's report, nothing staged. About 40 s on 2 cores."""
    import os
    import signal
    import threading
    import time

    from moelink.engine import EngineArgs
    from moelink.engine.core.llm_engine import LLMEngine

    kw = dict(ENGINE_KW, heartbeat_timeout=10.0)
    prompts = PROMPTS["kill"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def run(eng, on_step=None):
        done = {}
        for i, p in enumerate(prompts[:12]):
            eng.add_request(f"r{i}", p, params)
        deadline, late = time.monotonic() + 240, 12
        while eng.has_requests():
            assert time.monotonic() < deadline, eng.stats()
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = out
            if late < len(prompts):  # a steady stream: one more request per step
                eng.add_request(f"r{late}", prompts[late], params)
                late += 1
            if on_step is not None:
                on_step()
        return done

    want = {f"r{i}": one_rank[tuple(p)] for i, p in enumerate(prompts)}
    eng = LLMEngine(EngineArgs(model=skewed_model, expert_parallel_size=4, num_redundant_experts=4,
                               eplb_interval=3, elastic_ep=True, **kw).create_engine_config())
    ex = eng.executor
    victim, victim_pid = 1, ex.rank_pids[1]
    ctl = eng.eplb
    killed = threading.Event()
    seen: dict = {}

    def kill_mid_move():
        deadline = time.monotonic() + 120
        while not ctl.chunk_in_flight:  # the controller says a move chunk's collective is running
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)
        seen.update(moving=ctl.moving, pending=ctl.pending is not None, step=ctl.steps)
        os.kill(victim_pid, signal.SIGKILL)
        killed.set()

    serving: list[bool] = []
    restored = []

    def on_step():
        serving.append(ex.dead_error is None)
        if eng.elastic_stats.recoveries and not restored:  # later moves (at EP 3) at full speed
            ex._collective("eplb_test_slow_moves", 0.0)
            restored.append(True)

    try:
        ex._collective("eplb_test_slow_moves", 1.0)
        watcher = threading.Thread(target=kill_mid_move, daemon=True)
        watcher.start()
        done = run(eng, on_step)
        watcher.join(timeout=5)
        assert killed.is_set(), "no move chunk ran: the skew should make EPLB move experts"
        assert seen["moving"] and seen["pending"]
        # The kill landed inside that move: the old group's controller never finished it (no rebalance), and
        # the engine serves on with a controller of the survivors'.
        assert ctl.moving and ctl.rebalances == 0 and eng.eplb is not ctl
        stats = eng.elastic_stats
        print(f"\nkilled rank {victim} during a move chunk (step {seen['step']}); recovered in "
              f"{stats.last_recovery_seconds:.2f} s, {stats.requests_requeued} requests requeued; EPLB after: "
              f"{None if eng.eplb is None else eng.eplb.snapshot()['rebalances']} rebalances")
        assert stats.recoveries == 1 and stats.failed_recoveries == 0 and stats.history[0].dead_ranks == (victim,)
        assert all(serving) and ex.dead_error is None  # readiness never turned
        # Every request completed with its full output, greedy outputs as undisturbed.
        assert set(done) == set(want)
        for rid, out in done.items():
            assert out.outputs[0].finish_reason == "length" and out.outputs[0].token_ids == want[rid], rid
        for s in eng.rank_stats():  # no KV block leaked
            assert s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks, s
        # A move the restarted EPLB began at EP 3 ends at the next step boundaries (idle steps are boundaries too).
        for _ in range(4):
            if eng.eplb is None or not eng.eplb.moving:
                break
            eng.step()
        # The survivors' placement state is whole: no half-switched table, nothing staged, one layout.
        states = ex._collective("eplb_state")
        assert [s["rank"] for s in states] == [0, 1, 2] and ex.world_size == 3
        for s in states:
            assert not s["moving"] and s["staged_bytes"] == 0 and all(s["tables_match"]), s
            assert s["layouts"] == states[0]["layouts"]
        if eng.eplb is not None:  # online EPLB restarted for the survivors: its report is the ranks' layout
            assert [[list(r) for r in layer] for layer in eng.eplb.experts_on_ranks_per_layer()] == \
                states[0]["layouts"]
            assert not eng.eplb.moving and eng.eplb is not ctl
        else:
            assert [list(eng.ep_plan.placement.experts_on_rank(r)) for r in range(3)] == states[0]["layouts"][0]
    finally:
        eng.shutdown()
