"""The runner's persistent batch (engine/rank/input_batch.py): rows kept across steps, the same sampling metadata as
building it from the request lists, and penalty counts kept on the device that stay right while slots are
reused under a step in flight."""
from __future__ import annotations

import random

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.rank.device_stream import ThreadStream
from moelink.engine.rank.input_batch import PersistentBatch
from moelink.engine.rank.input_batch import CachedRequestState
from moelink.engine.rank.sampler import Sampler, SamplingMetadata

CPU = torch.device("cpu")


def _state(rid: str, params: SamplingParams, blocks: list[int], prompt=(1, 2, 3), outputs=(), seed=None):
    gen = None
    if seed is not None:
        gen = torch.Generator(device=CPU)
        gen.manual_seed(seed)
    return CachedRequestState(rid, list(prompt), list(outputs), params, list(blocks), 0, gen)


def test_rows_hold_block_tables_across_growth_and_reuse():
    batch = PersistentBatch(vocab_size=32, device=CPU, capacity=2, block_cols=2)
    rng = random.Random(0)
    states = {}
    for i in range(9):  # rows double 2 -> 4 -> 8 -> 16
        st = _state(f"r{i}", SamplingParams(), [rng.randrange(100) for _ in range(rng.randrange(1, 4))])
        batch.add(st)
        states[st.req_id] = st
    for st in states.values():  # columns double as tables grow; earlier views stay the table's rows
        st.add_blocks([rng.randrange(100) for _ in range(rng.randrange(0, 6))])
    order = list(states.values())
    rng.shuffle(order)
    rows = batch.rows_of(order)
    tables = batch.tables(rows)
    for s, st in enumerate(order):
        assert tables[s, : len(st.block_ids)].tolist() == st.block_ids
        assert st.block_arr[: len(st.block_ids)].tolist() == st.block_ids
    # A freed row is reused, and starts empty.
    gone = order[0]
    batch.remove(gone)
    assert gone.row is None and gone.block_arr[: len(gone.block_ids)].tolist() == gone.block_ids
    new = _state("new", SamplingParams(), [7])
    assert batch.add(new) == rows[0] and batch.tables(batch.rows_of([new])).tolist() == [[7]]
    assert len(batch) == 9


def _random_params(rng: random.Random, i: int) -> tuple[SamplingParams, int | None]:
    kind = rng.randrange(6)
    seed = None
    kw = dict(max_tokens=20)
    if kind == 0:
        kw.update(temperature=0.0)
    elif kind == 1:
        kw.update(temperature=0.8, top_k=rng.choice([0, 3, 40]), top_p=rng.choice([1.0, 0.7]))
        seed = 100 + i
    elif kind == 2:
        kw.update(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
    elif kind == 3:
        kw.update(temperature=0.9, min_p=0.1, frequency_penalty=-0.5, logprobs=2, min_tokens=5)
    elif kind == 4:
        kw.update(temperature=1.1, presence_penalty=0.7, stop_token_ids=[3], min_tokens=2)
        seed = 7 * i
    else:
        kw.update(temperature=0.5, logprobs=0)
    return SamplingParams(**kw), seed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metadata_from_the_batch_equals_building_it_from_the_lists(seed):
    """Same tensors, same sampled ids (and logprobs) as SamplingMetadata.build over the same rows, for mixes
    of greedy, seeded and unseeded random rows, top-k/top-p/min-p, penalties, min_tokens and logprobs."""
    rng = random.Random(seed)
    V = 40
    batch = PersistentBatch(vocab_size=V, device=CPU, capacity=4)
    states = []
    for i in range(14):
        params, gen_seed = _random_params(rng, i)
        prompt = [rng.randrange(V + 3) for _ in range(rng.randrange(1, 8))]  # ids >= V are ignored by both
        outputs = [rng.randrange(V) for _ in range(rng.randrange(0, 6))]
        st = _state(f"r{i}", params, [i], prompt, outputs, gen_seed)
        batch.add(st)
        states.append(st)
    for st in states[::4]:  # freed and refilled rows and slots
        batch.remove(st)
    for st in states[::4]:
        batch.add(st)
    batch.apply_device_ops(batch.take_device_ops())
    picked = [states[i] for i in rng.sample(range(len(states)), 10)]
    pending = [rng.randrange(2) for _ in picked]
    rows = batch.rows_of(picked)
    got = SamplingMetadata.from_batch(batch, rows, picked, {1}, CPU, None, pending)
    want = SamplingMetadata.build([st.params for st in picked], [st.prompt_token_ids for st in picked],
                                  [st.output_token_ids for st in picked], [st.generator for st in picked], {1}, V,
                                  CPU, None, pending)
    for name in ("num_rows", "all_greedy", "all_random", "max_top_k", "any_unseeded_random", "no_penalties",
                 "num_logprobs", "max_num_logprobs"):
        assert getattr(got, name) == getattr(want, name), name
    for name in ("greedy_mask_B", "temperature_B", "top_k_B", "top_p_B", "min_p_B", "repetition_penalty_B",
                 "frequency_penalty_B", "presence_penalty_B", "min_tokens_rows_M", "min_tokens_ids_M",
                 "logprob_rows_L"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name
    assert got.generators.keys() == want.generators.keys()
    counts_got, seen_got = got.penalty_tensors()
    counts_want, seen_want = want.penalty_tensors()
    has = torch.as_tensor(batch.penalty_slot_R[rows] >= 0)
    assert torch.equal(counts_got[has], counts_want[has])  # rows without penalties read a neutral slot
    assert torch.equal(seen_got[has], seen_want[has])
    # The same draws: each generator used by one path, a clone by the other.
    logits = torch.randn(len(picked), V, generator=torch.Generator().manual_seed(seed))
    saved = {i: g.get_state() for i, g in want.generators.items()}
    torch.manual_seed(5)
    out_want = Sampler()(logits, want)
    for i, g in got.generators.items():
        g.set_state(saved[i])
    torch.manual_seed(5)
    out_got = Sampler()(logits, got)
    assert torch.equal(out_got.token_ids_B, out_want.token_ids_B)
    assert (out_got.logprobs_packed_LX is None) == (out_want.logprobs_packed_LX is None)
    if out_got.logprobs_packed_LX is not None:
        assert torch.equal(out_got.logprobs_packed_LX, out_want.logprobs_packed_LX)


def test_penalty_counts_follow_sampled_tokens_on_the_device():
    batch = PersistentBatch(vocab_size=10, device=CPU)
    p = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    a = _state("a", p, [0], prompt=[1, 2], outputs=[4, 4])
    batch.add(a)
    rows = batch.rows_of([a])
    meta = SamplingMetadata.from_batch(batch, rows, [a], set(), CPU)
    batch.apply_device_ops(batch.take_device_ops())  # what the step's device work does first
    meta.record_penalised(torch.tensor([7]))
    counts, _ = meta.penalty_tensors()
    assert counts[0].tolist() == [0, 0, 0, 0, 2, 0, 0, 1, 0, 0]
    # A slot freed and handed to another request is refilled by the next step's device work, not at once: a
    # step still in flight may count into it before then.
    batch.remove(a)
    b = _state("b", p, [1], prompt=[3], outputs=[5])
    batch.add(b)
    meta.record_penalised(torch.tensor([9]))  # the step in flight, after the handover on the host
    batch.apply_device_ops(batch.take_device_ops())
    meta_b = SamplingMetadata.from_batch(batch, batch.rows_of([b]), [b], set(), CPU)
    assert meta_b.penalty_tensors()[0][0].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]


@pytest.mark.slow
def test_penalties_from_device_counts_match_the_lists_across_reused_slots(tiny_model, monkeypatch):
    """End to end: penalised requests through the overlapped loop (a stream thread, rows and penalty slots
    reused as requests finish and others start) give the tokens of a serial engine whose metadata is built from
    the request lists each step (SamplingMetadata.build, the pre-batch path)."""
    path = tiny_model("qwen3_e6k3")
    rng = random.Random(3)
    prompts, params = [], []
    for i in range(24):
        prompts.append([rng.randrange(5, 60) for _ in range(rng.randrange(3, 12))])
        params.append(SamplingParams(max_tokens=rng.randrange(3, 14), ignore_eos=True, temperature=0.0,
                                     repetition_penalty=rng.choice([1.0, 1.4]), frequency_penalty=rng.choice([0.0, 0.8]),
                                     presence_penalty=rng.choice([0.0, 0.5])))
    args = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=64, block_size=4)
    with LLM(path, async_scheduling=True, **args) as overlapped:
        # a CPU rank runs device work inline; a stream thread puts each step's device work out of the host's order
        overlapped.engine.executor.worker.runner.stream = ThreadStream()
        got = overlapped.generate(prompts, params, use_tqdm=False)
    with LLM(path, async_scheduling=False, **args) as serial:
        def from_lists(batch, rows_B, states, eos, device, bitmasks=None, num_pending=None):
            assert not any(num_pending or [])  # serial: every output is known on the host
            return SamplingMetadata.build([st.params for st in states], [st.prompt_token_ids for st in states],
                                          [st.output_token_ids for st in states], [st.generator for st in states],
                                          eos, batch.V, device, bitmasks, num_pending)

        monkeypatch.setattr(SamplingMetadata, "from_batch", staticmethod(from_lists))
        want = serial.generate(prompts, params, use_tqdm=False)
        monkeypatch.undo()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert len({tuple(o.outputs[0].token_ids) for o in got}) > 1
