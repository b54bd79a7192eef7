"""Pausing generation around a weight update (SGLang's pause_generation / continue_generation; engine/rl/control.py,
docs/rl.md), on an engine stepped by hand with requests in every state: every RequestOutput names the
weight version its tokens came from (RequestOutput.weight_version). "wait" lets started requests finish on the old
weights and starts nothing new; the update then lands, continue starts the rest on the new weights, and no request is
lost. "keep" holds started requests in place (their KV kept); an update reaches them and their outputs name both
versions (weight_versions), their blocks never cached. "abort" ends every request with finish reason "abort". Bad
modes and updates of started requests under "wait" are refused naming why."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.core.outputs import WeightVersionSpan
from moelink.engine.tools.tiny_model import make_tiny_model

from tests.helpers.parity import assert_pool_free, engine_greedy, prompts
from tests.helpers.tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.usefixtures("heap_held_frozen")
NEW = 6


def _run(engine, finished: dict) -> None:
    for out in engine.step():
        if out.finished:
            finished[out.request_id] = out


def _engine(path):
    return LLM(path, dtype="float32", max_num_seqs=3, max_num_batched_tokens=16, num_kv_blocks=64, block_size=4,
               enable_weight_updates=True)


@pytest.mark.slow
def test_update_under_load_with_pause_wait_loses_no_request(tiny_model, tmp_path):
    a = tiny_model("qwen3_e6k3")
    b = str(make_tiny_model(tmp_path / "b", **{**TINY_CONFIGS["qwen3_e6k3"], "seed": 1}))
    ps = prompts(TINY_CONFIGS["qwen3_e6k3"]["vocab_size"], seed=31, n=8, lo=2, hi=12)
    want_a, want_b = engine_greedy(_engine(a), ps, NEW), engine_greedy(_engine(b), ps, NEW)
    llm = _engine(a)
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, params)
    finished: dict = {}
    for _ in range(3):
        _run(eng, finished)
    eng.rl.pause_generation("wait")
    started = set(eng.rl.started_requests())
    assert 0 < len(started) < len(ps), "some requests must have started and some not"
    eng.add_request("late", ps[0], params)  # added while paused: waits
    with pytest.raises(ValueError, match="refused while started requests run .* mode='wait'"):
        llm.update_weights_from_disk(b)
    with pytest.raises(ValueError, match="generation is paused"):
        llm.generate(ps[:1], params, use_tqdm=False)
    while eng.rl.started_requests():
        _run(eng, finished)
    assert set(finished) == started, "only the started requests ran while paused"
    llm.update_weights_from_disk(b, weight_version="v1")
    eng.rl.continue_generation()
    while eng.has_requests():
        _run(eng, finished)
    assert set(finished) == {str(i) for i in range(len(ps))} | {"late"}
    for i in range(len(ps)):
        out = finished[str(i)]
        old = str(i) in started
        assert out.outputs[0].token_ids == (want_a if old else want_b)[i], i
        assert out.weight_version == (None if old else "v1") and out.weight_versions is None
    assert finished["late"].outputs[0].token_ids == want_b[0] and finished["late"].weight_version == "v1"
    assert_pool_free(llm)


@pytest.mark.slow
def test_keep_holds_requests_through_an_update_and_says_so(tiny_model, tmp_path):
    a = tiny_model("qwen3_e6k3")
    b = str(make_tiny_model(tmp_path / "b", **{**TINY_CONFIGS["qwen3_e6k3"], "seed": 1}))
    llm = _engine(a)
    eng = llm.engine
    llm.update_weights_from_disk(a, weight_version="v0")
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    p = list(range(1, 12))
    eng.add_request("held", p, params)
    finished: dict = {}
    for _ in range(4):  # its prompt (3 chunks) and a first token or so
        _run(eng, finished)
    eng.rl.pause_generation("keep")
    _run(eng, finished)  # the step in flight (the overlapped loop) is collected
    held = eng.schedulers[0].requests["held"]
    n_before = len(held.output_token_ids)
    assert 1 <= n_before < NEW
    for _ in range(3):
        assert eng.step() == []  # held: nothing scheduled
    assert len(held.output_token_ids) == n_before
    llm.update_weights_from_disk(b, weight_version="v1")
    eng.rl.continue_generation()
    while eng.has_requests():
        _run(eng, finished)
    out = finished["held"]
    assert len(out.outputs[0].token_ids) == NEW
    assert out.weight_version == "v1" and out.weight_versions == ("v0", "v1")
    # vLLM's spans over the output tokens: the held ones v0's, the rest v1's
    assert out.outputs[0].weight_versions == [WeightVersionSpan("v0", 0, n_before),
                                              WeightVersionSpan("v1", n_before, NEW)]
    # The same prompt now: computed whole (no KV of the old weights served), with the new weights alone.
    again = llm.generate([p], params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and again.weight_version == "v1" and again.weight_versions is None
    assert again.outputs[0].weight_versions == [WeightVersionSpan("v1", 0, NEW)]
    assert again.outputs[0].token_ids == engine_greedy(_engine(b), [p], NEW)[0]
    assert_pool_free(llm)


def test_control_calls_need_the_flag(tiny_model):
    path = tiny_model("qwen3_e6k3")
    llm = LLM(path, dtype="float32", num_kv_blocks=16, block_size=4)
    for call, args in [("pause_generation", ("wait",)), ("continue_generation", ()),
                       ("update_weights_from_disk", (path,)), ("destroy_weights_update_group", ("g",)),
                       ("init_weights_update_group", ("127.0.0.1", 1, 1, 2, "g"))]:
        with pytest.raises(ValueError, match=rf"{call} is refused: start the engine with enable_weight_updates=True "
                                             r"\(--enable-weight-updates\)"):
            getattr(llm, call)(*args)
    assert llm.get_weight_version() is None and llm.flush_cache() == 0  # reading and flushing need no flag


def test_abort_mode_and_bad_modes(tiny_model):
    llm = LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=32, block_size=4, enable_weight_updates=True)
    eng = llm.engine
    with pytest.raises(ValueError, match="mode='stop' is invalid: choose from abort, wait, keep"):
        llm.pause_generation("stop")
    eng.add_request("r", [1, 2, 3], SamplingParams(max_tokens=4))
    eng.step()
    info = llm.pause_generation("abort")
    assert info["aborted"] == 1 and not eng.has_unfinished_requests()
    llm.continue_generation()
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2 and out.weight_version is None
    # vLLM's clear_cache: the cached prefix is forgotten once paused (a 9-token prompt fills two blocks of 4: a hit before, a miss after)
    assert not llm.is_paused()
    llm.generate([list(range(1, 10))], SamplingParams(max_tokens=1), use_tqdm=False)
    assert llm.generate([list(range(1, 10))], SamplingParams(max_tokens=1), use_tqdm=False)[0].num_cached_tokens == 8
    with pytest.raises(ValueError, match="clear_cache=true is not taken with mode='keep'"):
        llm.pause_generation("keep", clear_cache=True)
    assert not llm.is_paused()
    info = llm.pause_generation("abort", clear_cache=True)
    assert info["num_blocks_freed"] >= 2 and llm.is_paused()
    llm.continue_generation()
    out = llm.generate([list(range(1, 10))], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    assert_pool_free(llm)


def test_an_update_that_drains_a_step_keeps_its_outputs(tiny_model):
    """The overlapped loop leaves a step in flight; an update collects it first, and what it produced (here a final
    output) comes back from the next step instead of being lost."""
    path = tiny_model("qwen3_e6k3")
    llm = LLM(path, dtype="float32", num_kv_blocks=32, block_size=4, enable_weight_updates=True)
    eng = llm.engine
    eng.add_request("r", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    finished: dict = {}
    _run(eng, finished)
    _run(eng, finished)  # the prefill collected; the decode step of its last token in flight
    eng.rl.pause_generation("keep")
    assert eng._pending is not None and "r" not in finished, "the test needs the final step in flight"
    llm.update_weights_from_disk(path)
    eng.rl.continue_generation()
    while eng.has_requests():
        _run(eng, finished)
    assert len(finished["r"].outputs[0].token_ids) == 2
    assert_pool_free(llm)
