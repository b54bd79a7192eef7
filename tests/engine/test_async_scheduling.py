"""The overlapped step loop (async scheduling): same outputs as the serial loop, nothing lost or leaked when a
request ends while a step is in flight, and the host really prepares step N+1 while the device runs step N.

The oracle is the serial loop (`async_scheduling=False`), itself checked against transformers by
tests/engine/test_parity.py.
"""
from __future__ import annotations

import random
import threading

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.contract.structured_output_params import StructuredOutputParams
from moelink.engine.rank.device_stream import ThreadStream
from moelink.scheduler.scheduler import Scheduler

pytestmark = pytest.mark.slow  # two engines over 200 requests


def _llm(path, overlap: bool, **kw) -> LLM:
    # float64: a batch's composition differs between the loops (a freed slot is refilled a step later), and
    # in float32 a row's logits may differ in the last bits with the batch around it.
    args = dict(dtype="float64", max_num_seqs=16, max_num_batched_tokens=64, num_kv_blocks=48, block_size=8,
                async_scheduling=overlap)
    args.update(kw)
    return LLM(path, **args)


def _mixed_requests(n: int, vocab: int, seed: int = 0):
    """Greedy, seeded random, penalties, logprobs, stop ids and strings, min_tokens, shared prefixes (prefix
    caching), long prompts (chunked prefill) and a small pool (preemption)."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(20)]
    prompts, params = [], []
    for i in range(n):
        prompt = (shared[: rng.choice([0, 8, 20])] + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))])
        kind = i % 6
        kw = dict(max_tokens=rng.randint(1, 24), ignore_eos=rng.random() < 0.7)
        if kind == 0:
            kw.update(temperature=0.0)
        elif kind == 1:
            kw.update(temperature=0.9, top_p=0.9, top_k=20, seed=1000 + i)
        elif kind == 2:
            kw.update(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3)
        elif kind == 3:
            kw.update(temperature=0.7, seed=i, logprobs=2, min_tokens=min(3, kw["max_tokens"]))
        elif kind == 4:
            kw.update(temperature=0.0, stop_token_ids=[rng.randrange(3, vocab) for _ in range(3)])
        elif i % 12 == 5:  # structured output: the loop drains for its masks, the outputs must not change
            kw.update(temperature=1.0, seed=3 * i, max_tokens=12,
                      structured_outputs=StructuredOutputParams(regex=r"[a-z]{1,4}( [a-z]{1,4}){0,3}"))
        else:
            kw.update(temperature=0.8, seed=7 * i, min_p=0.05, stop=["e", "a "], frequency_penalty=0.2)
        prompts.append(prompt)
        params.append(SamplingParams(**kw))
    return prompts, params


def _summary(outs):
    def lps(c):
        if c.logprobs is None:
            return None
        return [sorted((t, round(lp.logprob, 9), lp.rank, lp.decoded_token) for t, lp in d.items()) for d in c.logprobs]
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason, o.outputs[0].stop_reason,
             lps(o.outputs[0])) for o in outs]


def _idle_and_clean(llm: LLM) -> None:
    eng = llm.engine
    assert not eng.has_requests() and eng._pending is None
    for s in eng.schedulers:
        st = s.stats()
        assert st.num_free_blocks == st.num_total_blocks and not s.requests and not s._scheduled
    assert not eng.executor.worker.runner.requests  # the worker holds no request state


def test_overlap_matches_serial_on_200_mixed_requests(tiny_model):
    path = tiny_model("qwen3_e6k3")
    with _llm(path, overlap=False) as serial, _llm(path, overlap=True) as overlapped:
        prompts, params = _mixed_requests(200, serial.engine.config.model.vocab_size)
        want = serial.generate(prompts, params, use_tqdm=False)
        got = overlapped.generate(prompts, params, use_tqdm=False)
        assert _summary(got) == _summary(want)
        # The run really preempted, hit the prefix cache and chunked (the paths the overlap must keep exact).
        stats = overlapped.engine.stats()
        assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0
        _idle_and_clean(overlapped)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_abort_while_a_step_is_in_flight(tiny_model, overlap):
    """An abort between launch and collect: the request's final output comes at once, its row in the step in
    flight is discarded (no token after the abort), its KV blocks go back, the worker forgets it."""
    path = tiny_model("qwen3_e6k3")
    with _llm(path, overlap) as llm:
        eng = llm.engine
        p = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
        for i in range(4):
            eng.add_request(f"r{i}", [5 + i, 6, 7, 8], p)
        tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(4)}
        for _ in range(5):
            for o in eng.step():
                tokens[o.request_id] = o.outputs[0].token_ids
        assert (eng._pending is not None) == overlap
        final = eng.abort_requests(["r1"])
        assert len(final) == 1 and final[0].finished and final[0].outputs[0].finish_reason == "abort"
        n_at_abort = len(final[0].outputs[0].token_ids)
        while eng.has_requests():
            for o in eng.step():
                assert o.request_id != "r1", "an output after the abort"
                tokens[o.request_id] = o.outputs[0].token_ids
        assert n_at_abort < 30 and all(len(tokens[f"r{i}"]) == 30 for i in (0, 2, 3))
        _idle_and_clean(llm)


def test_stop_string_while_a_step_is_in_flight_matches_serial(tiny_model):
    """A stop string found one step late (the next step is already on the device): the output ends at the
    stop exactly as in the serial loop, nothing after it is streamed, and the wasted row's KV is freed."""
    path = tiny_model("qwen3_e6k3")
    with _llm(path, overlap=False) as serial, _llm(path, overlap=True) as overlapped:
        base = serial.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0]
        stop = base.text[len(base.text) // 2:][:2]
        assert stop
        p = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])
        streamed: list[str] = []
        eng = overlapped.engine
        from moelink.engine.core.outputs import OutputKind

        eng.add_request("s", [5, 6, 7, 8], p, output_kind=OutputKind.DELTA)
        while eng.has_requests():
            streamed += [o.outputs[0].text for o in eng.step()]
        want = serial.generate([[5, 6, 7, 8]], p, use_tqdm=False)[0].outputs[0]
        assert "".join(streamed) == want.text and stop not in want.text
        _idle_and_clean(overlapped)


def test_host_schedules_the_next_step_while_the_device_runs(tiny_model, monkeypatch):
    """The overlap itself, without timing: the device stand-in (the model's forward, on the stream thread)
    does not finish step k until the host has scheduled step k + 1. The overlapped loop passes; the serial
    loop cannot (it waits for step k before scheduling k + 1), which the control run shows."""
    path = tiny_model("qwen3_e6k3")
    cond = threading.Condition()
    count = {"scheduled": 0}
    orig = Scheduler.schedule

    def schedule(self):
        out = orig(self)
        with cond:
            count["scheduled"] += 1
            cond.notify_all()
        return out

    monkeypatch.setattr(Scheduler, "schedule", schedule)

    def run(overlap: bool, timeout: float) -> tuple[int, int]:
        steps = [0, 0]  # device steps, and those whose next step was not scheduled meanwhile
        with _llm(path, overlap, max_num_seqs=256, max_num_batched_tokens=2048, num_kv_blocks=256) as llm:
            runner = llm.engine.executor.worker.runner
            if overlap:  # a CPU rank runs its device work inline; a stream thread lets the overlap show on a CPU
                runner.stream = ThreadStream()
            model = runner.model
            forward = model.forward

            def stand_in(input_ids_T, positions_T, ctx):
                h = forward(input_ids_T, positions_T, ctx)
                steps[0] += 1
                k = steps[0]
                with cond:  # step k's device work ends only once the host scheduled step k + 1
                    if not cond.wait_for(lambda: count["scheduled"] >= k + 1, timeout=timeout):
                        steps[1] += 1
                return h

            count["scheduled"] = 0
            model.forward = stand_in
            llm.generate([[5 + i % 40, 6, 7] for i in range(64)],
                         SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), use_tqdm=False)
        return steps[0], steps[1]

    steps, missed = run(overlap=True, timeout=60.0)
    assert steps >= 6 and missed == 0
    steps, missed = run(overlap=False, timeout=0.2)  # control: the serial loop never overlaps
    assert steps >= 6 and missed == steps


def test_a_cpu_worker_runs_its_device_work_inline_in_both_loops(tiny_model):
    """A stream thread on a CPU rank costs more in GIL hand-overs than it hides (engine/rank/device_stream.py)."""
    path = tiny_model("qwen3_e6k3")
    for overlap in (True, False):
        with _llm(path, overlap=overlap) as llm:
            assert llm.engine.executor.worker.runner.stream.name == "inline"
    assert torch.get_num_threads() >= 1
