"""Decode CUDA graphs (engine/rank/cuda_graph.py): the padded static-buffer path, on CPU.

No GPU here, so the capture itself is replaced by `Replay` (an `EagerReplay`: the
forward re-run on the same static buffers); everything else the GPU path does runs:
bucket choice, copy-in and re-padding of the static inputs, the metadata fixed
at capture, KV slot -1 for padding rows, the expert-counter mask. The Triton
kernels run in the interpreter, as the graphs capture only them.
tests/engine/test_gpu_engine.py captures real graphs when a GPU is present.
"""
from __future__ import annotations

import logging
import random

import pytest

from types import SimpleNamespace

from moelink.comm import make_all_to_all
from moelink.comm.ep_modes import LOW_LATENCY, TwoModeAllToAll
from moelink.engine import LLM, SamplingParams
from moelink.engine.rank.cuda_graph import EagerReplay
from moelink.engine.contract.ep_step import EPStepPlan

from tests.helpers.fakes import KernelsName
from tests.helpers.graph_replays import Replay, count_replays

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)



# -- the padded static-buffer path -------------------------------------------------------------------------
def _llm(path, kernels):
    return LLM(path, dtype="float32", device="cpu", kernels=kernels, max_num_seqs=6, max_num_batched_tokens=64,
               num_kv_blocks=48, block_size=16, enable_prefix_caching=False,
               skip_warmup=True)  # warm-up: test_triton_warmup.py


def _runner(llm):
    return llm.engine.executor.worker.runner


def _generate(llm, prompts):
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=3) for m in (5, 2, 4, 2, 3)]
    outs = llm.generate(prompts, params[: len(prompts)], use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


_EAGER: dict = {}


def _eager_reference(path):
    """(prompts, the eager engine, its outputs) for a checkpoint, run once per module: the graph tests of one
    checkpoint compare against the same eager run (the interpreter makes each run cost tens of seconds).
    Five sequences of different lengths (one past a 16-token block; short, as the interpreter's cost grows with
    the tokens of a step) and output budgets 2-5: decode batches
    shrink 5 → 3 → 2 → 1 as they finish, one step each, so steps land on sizes 1, 2 and 4 (3 padded to 4) and on
    5 (above the largest size: eager)."""
    if path not in _EAGER:
        rng = random.Random(1)
        prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (1, 5, 3, 17, 2)]
        eager = _llm(path, "triton")
        _EAGER[path] = (prompts, eager, _generate(eager, prompts))
    return _EAGER[path]


@pytest.mark.slow
@pytest.mark.xdist_group("decode_graphs")  # one worker, so the eager reference is shared (_eager_reference)
@pytest.mark.parametrize("name", ["qwen3_e6k3", "dsv3_neox"])  # GQA K/V cache; MLA latent cache
def test_graph_decode_matches_eager_on_the_same_kernels(tiny_model, hf_tiny_model, kdev, name):
    if kdev.type != "cpu":
        pytest.skip("CPU stand-in for the capture; with a GPU, test_gpu_engine.py captures real graphs")
    path = tiny_model(name) if name.startswith("qwen3") else hf_tiny_model(name)
    prompts, eager, want = _eager_reference(path)

    llm = _llm(path, "triton")
    runner = _runner(llm)
    runner.graph_sizes, runner.graph_backend = (1, 2, 4), Replay()
    runner._capture_graphs()
    assert runner.graphs is not None and set(runner.graphs.steps) == {1, 2, 4}
    assert not runner.model.moe_stats.counts_LG.any(), "warm-up and capture runs must not count as traffic"
    replays = count_replays(runner.graphs)
    got = _generate(llm, prompts)
    assert all(replays.values()), f"every captured size should have served a step: {replays}"
    for (tok_w, lps_w), (tok_g, lps_g) in zip(want, got):
        assert tok_g == tok_w
        for lw, lg in zip(lps_w, lps_g):
            assert lw.keys() == lg.keys()
            assert max(abs(lw[t].logprob - lg[t].logprob) for t in lw) < 1e-4
    # Padding rows are not counted as routed tokens: the counters equal the eager engine's.
    assert llm.engine.expert_load().tokens_per_expert_LG == eager.engine.expert_load().tokens_per_expert_LG
    # ... and wrote no KV: the null block (last) is still all zeros in every cache tensor of every layer.
    for layer in runner.kv_caches:
        assert all(not t[-1].any() for t in layer)


def test_graphs_stay_off_where_they_cannot_be_right(tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="moelink.engine.rank.model_runner")
    llm = _llm(tiny_model("qwen3_e6k3"), "reference")
    runner = _runner(llm)
    assert runner.graphs is None
    assert runner._graph_sizes((1, 2), None, EagerReplay()) == ()
    assert "read host-side lengths" in caplog.text
    runner.kernels = KernelsName("triton")
    # Under EP only a fixed-capacity backend's low-latency mode is graph safe, up to its decode capacity.
    counted = SimpleNamespace(all_to_all=make_all_to_all("torch", object(), 0, 1, "cpu"))
    assert runner._graph_sizes((1, 2), counted, EagerReplay()) == ()
    assert "decode graphs under expert parallelism need" in caplog.text
    padded = make_all_to_all("torch_padded", None, 0, 1, "cpu", max_tokens_per_rank=8)
    two_mode = SimpleNamespace(all_to_all=TwoModeAllToAll(padded, 2))
    assert runner._graph_sizes((1, 2, 4), two_mode, EagerReplay()) == (1, 2)
    assert runner._graph_sizes((1, 2), two_mode, None) == ()  # a real capture: direct NCCL only
    assert "only the nccl all-to-all is captured, not torch_padded" in caplog.text
    assert runner._graph_sizes((1, 2), None, None) == ()  # CPU device and no stand-in backend
    assert "not a CUDA device" in caplog.text
    assert runner._graph_sizes((1, 2), None, EagerReplay()) == (1, 2)


class _FailingBackend(Replay):
    """Replay whose capture raises for chosen sizes, as torch.cuda.graph would."""

    def __init__(self, fail: dict[int, str]):
        self.fail = fail

    def capture(self, fn):
        b = fn.__defaults__[0]  # DecodeGraphs binds the size as the lambda's default
        if b in self.fail:
            raise RuntimeError(self.fail[b])
        return super().capture(fn)


@pytest.mark.slow
def test_a_size_out_of_memory_is_dropped_and_the_rest_kept(tiny_model, caplog):
    llm = _llm(tiny_model("qwen3_e6k3"), "triton")
    runner = _runner(llm)
    runner.graph_sizes = (1, 2, 4)
    runner.graph_backend = _FailingBackend({4: "CUDA out of memory. Tried to allocate 2.00 GiB"})
    runner._capture_graphs()
    assert runner.graphs is not None and runner.graphs.sizes == (1, 2) and runner.graphs.max_batch == 2
    assert "decode batch 4 not captured" in caplog.text
    # A failure that is not memory (a host sync inside the forward) would hit every size: none are kept.
    runner.graph_backend = _FailingBackend({4: "operation not permitted when stream is capturing"})
    runner.allocate_kv_cache(48)
    assert runner.graphs is None
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2  # eager decoding still serves


@pytest.mark.slow
def test_padding_rows_route_to_no_expert(tiny_model):
    """One sequence decoding through a size-4 graph: rows 1-3 are padding and reach the experts as id -1
    (no weight reads, no load), while the real row keeps its top-k."""
    llm = _llm(tiny_model("qwen3_e6k3"), "triton")
    runner = _runner(llm)
    runner.graph_sizes, runner.graph_backend = (4,), Replay()
    runner._capture_graphs()
    seen = []
    inner = runner.kernels.fused_moe

    def spy(x, w13, w2, tw, ti, *rest, **kw):
        seen.append(ti.clone())
        return inner(x, w13, w2, tw, ti, *rest, **kw)

    runner.kernels.fused_moe = spy
    try:
        llm.generate([[9] * 7], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    finally:
        runner.kernels.fused_moe = inner
    padded = [ti for ti in seen if ti.shape[0] == 4]
    assert padded, "no decode step went through the size-4 graph"
    for ti in padded:
        assert (ti[0] >= 0).all() and (ti[1:] == -1).all()
    assert all((ti >= 0).all() for ti in seen if ti.shape[0] == 7)  # the eager prefill step is untouched


@pytest.mark.slow
@pytest.mark.xdist_group("decode_graphs")
def test_graphs_under_ep_replay_the_size_the_driver_chose_in_low_latency(tiny_model, kdev):
    """Expert parallelism on the two-mode path (torch_padded at world size 1: real dispatch and combine, ids
    -1 for padding rows) with decode graphs. The driver's plan is widened as if a peer rank decoded 4
    sequences (graph_batch 4): every low-latency decode step then replays the size-4 graph whatever its own
    batch, as all ranks must; the step of 5 sequences exceeds the decode capacity 4 and runs high-throughput,
    eagerly. Tokens equal the eager engine without EP, and padding rows count in no expert's load."""
    if kdev.type != "cpu":
        pytest.skip("CPU stand-in for the capture; with a GPU, tests/comm captures NCCL in a real graph")
    path = tiny_model("qwen3_e6k3")
    prompts, eager, want = _eager_reference(path)

    llm = LLM(path, dtype="float32", device="cpu", kernels="triton", max_num_seqs=6, max_num_batched_tokens=64,
              num_kv_blocks=48, block_size=16, enable_prefix_caching=False, all_to_all="torch_padded",
              ep_decode_capacity=4, skip_warmup=True)  # warm-up: test_triton_warmup.py
    runner = _runner(llm)
    runner.graph_sizes, runner.graph_backend = (1, 2, 4), Replay()
    runner._capture_graphs()
    assert runner.graphs is not None and set(runner.graphs.steps) == {1, 2, 4}
    executor = llm.engine.executor
    real_plan = executor.plan_ep_step

    def as_if_a_peer_decoded_four(outputs):
        real_plan(outputs)
        for so in outputs:
            if so.ep_step.mode == LOW_LATENCY:
                so.ep_step = EPStepPlan(LOW_LATENCY, 4, 4)

    executor.plan_ep_step = as_if_a_peer_decoded_four
    replays = []
    for b, step in runner.graphs.steps.items():
        def counting(inner=step.replay, b=b):
            replays.append((b, runner.ep.all_to_all.mode.name))
            return inner()

        step.replay = counting
    got = _generate(llm, prompts)
    assert replays and set(replays) == {(4, LOW_LATENCY)}, replays
    modes = llm.engine.moe_metrics.per_mode
    assert modes["high_throughput"]["steps"] > 1  # the prefill, and the 5-sequence decode step
    for (tok_w, lps_w), (tok_g, lps_g) in zip(want, got):
        assert tok_g == tok_w
        for lw, lg in zip(lps_w, lps_g):
            assert max(abs(lw[t].logprob - lg[t].logprob) for t in lw) < 1e-4
    assert llm.engine.expert_load().tokens_per_expert_LG == eager.engine.expert_load().tokens_per_expert_LG


@pytest.mark.slow
def test_replayed_decode_steps_record_routed_experts(tiny_model):
    """--enable-return-routed-experts under decode graphs: the MoE layers' routed-id copies are part of what a graph
    replays (moe/routing_capture.py), so replayed steps record the same ids as the eager engine's, padding rows
    aside."""
    path = tiny_model("qwen3_e6k3")
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (1, 5, 3, 17, 2)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, return_routed_experts=True)
              for m in (5, 2, 4, 2, 3)]

    def run(graphs: bool):
        llm = LLM(path, dtype="float32", device="cpu", kernels="triton", max_num_seqs=6, max_num_batched_tokens=64,
                  num_kv_blocks=48, block_size=16, enable_prefix_caching=False, skip_warmup=True,
                  enable_return_routed_experts=True)
        if graphs:
            runner = _runner(llm)
            runner.graph_sizes, runner.graph_backend = (1, 2, 4), Replay()
            runner._capture_graphs()
            replays = count_replays(runner.graphs)
        outs = llm.generate(prompts, params, use_tqdm=False)
        if graphs:
            assert all(replays.values()), f"every captured size should have served a step: {replays}"
        return [o.outputs[0] for o in outs]

    for e, g in zip(run(False), run(True)):
        assert e.token_ids == g.token_ids and (e.routed_experts == g.routed_experts).all()


def test_a_runner_given_its_cache_size_captures_its_graphs_at_construction(tiny_model):
    """`num_kv_blocks` given to ModelRunner allocates the cache in the constructor, and with it captures the decode
    graphs: everything the capture reads must exist by then. (The engine's executors size the cache later, so only
    a GPU run saw this: 2026-11-27's lease found every CUDA-graph engine failing on `self.lora`, set after it.)"""
    import torch

    from moelink.engine.config.model import ModelConfig
    from moelink.engine.rank.model_runner import ModelRunner

    cfg = ModelConfig.from_pretrained(tiny_model("qwen3_e6k3"), "float32")
    runner = ModelRunner(cfg, 16, 8, torch.device("cpu"), kernels="triton", cuda_graph_sizes=(1, 2),
                         graph_backend=Replay())  # the warm-up forward reads what the capture would
    assert runner.graphs is not None and runner.plugin("lora") is None
