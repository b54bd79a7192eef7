"""Verify graphs (engine/rank/cuda_graph.py): speculative verify steps of 1 + k tokens per row replay a captured
graph, on CPU.

As in test_decode_graphs.py, the capture is replaced by `Replay` (an `EagerReplay`: the forward re-run on the static
buffers) and the Triton kernels run in the interpreter: what is checked is everything but the capture itself: which
steps replay a verify graph, the padded rows (1 + k tokens each over the null block), the flat token layout the
acceptance rule reads, the host lengths at their bound (split planning for the longest context), and outputs
equal to the eager engine's on the same kernels.
"""
from __future__ import annotations

import functools
import logging
import random
from types import SimpleNamespace

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.rank.graph_policy import verify_graph_len, verify_sizes

from moelink.benchmarks.spec_decode import OracleDrafter

from tests.helpers.graph_replays import Replay, count_replays

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)



K = 2  # drafts per step: verify rows of 3 tokens


class UnevenDrafter(OracleDrafter):
    """The oracle's drafts, cut to a length that varies with the request and the position (0 to K): the rows a
    step verifies then have 1 to 1 + K tokens, as an n-gram lookup or the scheduler's draft control leaves them."""

    def propose(self, states, k: int) -> list[list[int]]:
        out = super().propose(states, k)
        return [d[: (len(st.prompt_token_ids) + len(st.output_token_ids)) % (k + 1)] for st, d in zip(states, out)]


def _llm(path, spec=None):
    return LLM(path, dtype="float32", device="cpu", kernels="triton", max_num_seqs=6, max_num_batched_tokens=64,
               num_kv_blocks=64, block_size=8, max_model_len=64, enable_prefix_caching=False, skip_warmup=True,
               speculative_config=spec)


PARAMS = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)


def _run(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.fixture(scope="module")
def reference(tiny_model):
    """(checkpoint, prompts, plain decoding's outputs): one eager run shared by the tests here (the interpreter
    makes each engine run cost tens of seconds)."""
    path = tiny_model("qwen3_e6k3")
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (5, 13, 2)]
    with _llm(path) as plain:
        return path, prompts, _run(plain, prompts)


@pytest.mark.slow
def test_verify_steps_replay_graphs_and_match_eager(reference, kdev):
    if kdev.type != "cpu":
        pytest.skip("CPU stand-in for the capture; a GPU captures real graphs (tests/engine/test_gpu_engine.py)")
    path, prompts, want = reference

    def run(llm):
        return _run(llm, prompts)

    ref = {tuple(p): w for p, w in zip(prompts, [t for t, _ in want])}
    spec = {"method": "ngram", "num_speculative_tokens": K,
            "drafter_factory": functools.partial(UnevenDrafter, ref, 0.7, vocab=400, seed=5)}
    with _llm(path, spec) as llm:
        runner = llm.engine.executor.worker.runner
        runner.graph_sizes, runner.graph_backend = (1, 2, 4), Replay()
        runner._capture_graphs()
        graphs = runner.graphs
        assert graphs is not None and graphs.verify_len == 1 + K
        assert set(graphs.steps) == {1, 2, 4} and set(graphs.verify_steps) == {1, 2, 4}
        assert not runner.model.moe_stats.counts_LG.any(), "capture runs must not count as traffic"
        decode, verify = count_replays(graphs), count_replays(graphs, verify=True)
        staged_rows = []  # the query lengths of each step staged for a verify graph
        stage = graphs.stage

        def spy(*args, query_lens=None, **kw):
            if query_lens is not None and max(query_lens) > 1:
                staged_rows.append(list(query_lens))
            return stage(*args, query_lens=query_lens, **kw)

        graphs.stage = spy
        got = run(llm)
        # Padding wrote no KV: the null block (last) is still zero in every cache tensor.
        for layer in runner.kv_caches:
            assert all(not t[-1].any() for t in layer)
    assert sum(verify.values()) > 0, f"no verify step replayed a graph: {verify} (decode replays {decode})"
    assert any(verify[b] for b in (2, 4)), f"padded verify sizes never served a step: {verify}"
    # Rows of fewer than 1 + K tokens (front-padded in the graph) among the replayed verify steps.
    assert any(min(rows) < 1 + K for rows in staged_rows), f"no ragged verify step replayed: {staged_rows}"
    # Against plain decoding on the same kernels (an eager verify run in between is one more interpreter engine
    # run for nothing: verify rows and decode rows give the same logprobs to fp32 rounding).
    for (tok_w, lps_w), (tok_g, lps_g) in zip(want, got):
        assert tok_g == tok_w
        for lw, lg in zip(lps_w, lps_g):
            assert lw.keys() == lg.keys()
            assert max(abs(lw[t].logprob - lg[t].logprob) for t in lw) < 1e-4


def test_verify_graphs_stay_off_where_they_cannot_be_right(caplog):
    caplog.set_level(logging.INFO)
    gqa = SimpleNamespace(attention=SimpleNamespace(kind="gqa"), cache_dtype=None)
    assert verify_graph_len(gqa, 0, 16) == 1  # no speculation: decode graphs only
    assert verify_graph_len(gqa, 3, 16) == 4
    assert verify_graph_len(gqa, 16, 16) == 1
    assert "exceed a KV block (16)" in caplog.text
    mla_fp8 = SimpleNamespace(attention=SimpleNamespace(kind="mla"), cache_dtype=torch.float8_e4m3fn)
    assert verify_graph_len(mla_fp8, 2, 16) == 1
    assert "fp8 MLA cache" in caplog.text
    mla = SimpleNamespace(attention=SimpleNamespace(kind="mla"), cache_dtype=torch.bfloat16)
    assert verify_graph_len(mla, 2, 16) == 3
    # Under expert parallelism: the sizes whose b x (1 + k) tokens fit the low-latency capacity.
    ep = SimpleNamespace(all_to_all=SimpleNamespace(decode_capacity=8))
    assert verify_sizes((1, 2, 4), 3, None) == (1, 2, 4)
    assert verify_sizes((1, 2, 4), 3, ep) == (1, 2)
    assert "verify graphs above the EP decode capacity 8 tokens dropped" in caplog.text
    assert verify_sizes((1, 2, 4), 1, ep) == ()


@pytest.mark.slow
def test_verify_graphs_under_ep_replay_in_low_latency(reference, kdev):
    """Expert parallelism on the two-mode path (torch_padded at world size 1: real dispatch and combine) with
    speculation: verify steps within the decode capacity run low-latency and replay verify graphs (sizes whose
    b x 3 tokens fit the capacity 12: all three here); outputs equal plain decoding."""
    if kdev.type != "cpu":
        pytest.skip("CPU stand-in for the capture")
    path, prompts, plain = reference
    want = [t for t, _ in plain]

    def tokens(llm):
        return [t for t, _ in _run(llm, prompts)]

    spec = {"method": "ngram", "num_speculative_tokens": K,
            "drafter_factory": functools.partial(OracleDrafter, dict(zip(map(tuple, prompts), want)), 0.8,
                                                 vocab=400, seed=2)}
    with LLM(path, dtype="float32", device="cpu", kernels="triton", max_num_seqs=6, max_num_batched_tokens=64,
             num_kv_blocks=64, block_size=8, max_model_len=64, enable_prefix_caching=False, skip_warmup=True,
             all_to_all="torch_padded", ep_decode_capacity=12, speculative_config=spec) as llm:
        runner = llm.engine.executor.worker.runner
        runner.graph_sizes, runner.graph_backend = (1, 2, 4), Replay()
        runner._capture_graphs()
        assert set(runner.graphs.steps) == set(runner.graphs.verify_steps) == {1, 2, 4}
        modes = []
        for b, step in runner.graphs.verify_steps.items():
            def counting(inner=step.replay, b=b):
                modes.append((b, runner.ep.all_to_all.mode.name))
                return inner()

            step.replay = counting
        got = tokens(llm)
    assert modes and {m for _, m in modes} == {"low_latency"}, modes
    assert got == want
