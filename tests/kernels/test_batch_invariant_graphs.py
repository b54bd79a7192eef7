"""Decode graphs of batch-invariant mode's Triton backend (engine/rank/graph_policy.py, engine/rank/cuda_graph.py
`bound_host_lengths`; docs/rl.md#batch-invariant-mode) on CPU: the capture replaced by the stand-in (`Replay`, the
forward re-run on the graph's static buffers), the backend's kernels in the Triton interpreter.

One module-scoped pair of engines on the tiny Qwen3-MoE: eager, and with decode graphs at 1 / 2 / 4. The invariant
attention's key split is cut to the interpreter's key tile (16) so that the requests' contexts cross split edges, as
a GPU's 512-key splits do past 512 tokens: a decode graph captured with the padding's host max_seq_len (1) would
size its split grid to one split and merge partials it never wrote. tests/engine/test_gpu_batch_invariant_graphs.py
checks the same on a GPU with real graphs.
"""
from __future__ import annotations

import logging
import random
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import _get_current_function_mode_stack

from moelink.engine import LLM, SamplingParams
from moelink.engine.rank.cuda_graph import EagerReplay
from moelink.kernels.batch_invariant_triton import TritonBatchInvariantMode
from moelink.kernels.ops import REFERENCES

from tests.helpers.fakes import KernelsName
from tests.helpers.graph_replays import Replay, count_replays

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

SPLIT = 16  # keys per split here (the interpreter's key tile; SPLIT_KEYS is 512 on a GPU)


class _ModeSeen(Replay):
    """Replay that records which torch function modes are active when a size is captured."""

    def __init__(self):
        self.modes: list[list[type]] = []

    def capture(self, fn):
        self.modes.append([type(m) for m in _get_current_function_mode_stack()])
        return super().capture(fn)


def _llm(path):
    return LLM(path, dtype="float32", device="cpu", kernels="batch_invariant_triton", max_num_seqs=4,
               max_num_batched_tokens=32, num_kv_blocks=24, block_size=16, enable_prefix_caching=False,
               max_model_len=64, skip_warmup=True)


@pytest.fixture(scope="module")
def engines(tiny_model):
    """(eager engine, graph engine, the graphs' capture backend, the plain-torch ops the graph forwards called)."""
    mp = pytest.MonkeyPatch()
    import moelink.kernels.triton_invariant_attention as attention

    mp.setattr(attention, "SPLIT_KEYS", SPLIT)
    path = tiny_model("qwen3_e6k3")
    eager, graphed = _llm(path), _llm(path)
    runner = graphed.engine.executor.worker.runner
    backend = _ModeSeen()
    runner.graph_sizes, runner.graph_backend = (1, 2, 4), backend
    # Every op the graphs' forwards call that is not one of the backend's Triton kernels (a plain-torch form): the
    # reference functions the backend kept (kernels/ops.py REFERENCES) and the plain-torch invariant forms.
    plain: list[str] = []
    kernels = runner.kernels
    triton_ops = {op for op, fn in vars(kernels).items() if callable(fn) and "triton" in getattr(fn, "__module__", "")}
    inner = {op: getattr(kernels, op) for op in REFERENCES if op not in triton_ops and hasattr(kernels, op)}
    for op, fn in inner.items():
        setattr(kernels, op, lambda *a, _op=op, _fn=fn, **k: (plain.append(_op), _fn(*a, **k))[1])
    runner._capture_graphs()
    for op, fn in inner.items():
        setattr(kernels, op, fn)
    try:
        yield eager, graphed, backend, plain
    finally:
        eager.shutdown()
        graphed.shutdown()
        mp.undo()


def _target_and_others():
    rng = random.Random(3)
    target = [rng.randrange(3, 400) for _ in range(13)]  # decodes at positions 13-17: across the split at 16
    others = [[rng.randrange(3, 400) for _ in range(n)] for n in (6, 3)]
    return target, others


def _run(llm, prompts, max_tokens):
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=0) for m in max_tokens]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
            for o in outs]


@pytest.mark.slow  # over 1 s (interpreter, 2026-11-27: ~25 s for both engines)
def test_invariant_decode_graphs_give_a_request_the_eager_bits_alone_and_in_padded_batches(engines, kdev):
    """A request's tokens and logprobs through the graphs, alone (batch-1 graph) and among 2 others (its decode
    steps replay the size-4 graph with a padding row, then the size-2 and size-1 ones as the others finish),
    bitwise equal the eager engine's alone; every captured size served a step, the capture ran inside the backend's
    step context, and no plain-torch op ran in a captured forward."""
    if kdev.type != "cpu":
        pytest.skip("CPU stand-in for the capture; with a GPU, tests/engine/test_gpu_batch_invariant_graphs.py")
    eager, graphed, backend, plain = engines
    runner = graphed.engine.executor.worker.runner
    assert runner.graphs is not None and set(runner.graphs.steps) == {1, 2, 4}
    assert runner.graphs.bound_host_lengths, "the invariant attention's grid must be sized by max_model_len"
    assert backend.modes and all(TritonBatchInvariantMode in m for m in backend.modes), backend.modes
    assert not plain, f"plain-torch ops in a captured forward (they read host lengths): {sorted(set(plain))}"
    target, others = _target_and_others()
    want = _run(eager, [target], [5])[0]
    replays = count_replays(runner.graphs)
    alone = _run(graphed, [target], [5])[0]
    assert replays[1] >= 4 and replays[2] == replays[4] == 0, replays
    # 6 + 13 + 3 prompt tokens fit one step (32); then 3 rows decode on the size-4 graph (one padding row), 2 on
    # the size-2 one, the request alone on the size-1 one.
    batch = _run(graphed, [others[0], target, others[1]], [3, 5, 4])[1]
    assert replays[4] >= 2 and replays[2] >= 1, replays
    assert alone == want
    assert batch == want


def test_invariant_triton_graphs_are_captured_only_where_every_op_is_captured(caplog):
    """graph_policy: the batch-invariant Triton backend gets decode graphs for a float GQA model at one rank; the
    plain-torch backends (reference, batch_invariant) keep theirs off for the host lengths they read, and the
    Triton one keeps them off for other attention kinds, per-sequence state, EP, TP and quantized weights, each with
    its reason logged."""
    from moelink.engine.rank.graph_policy import graph_sizes_to_capture

    caplog.set_level(logging.INFO)
    gqa, mla, linear = (SimpleNamespace(kind=k) for k in ("gqa", "mla", "linear"))
    qwen3 = SimpleNamespace(attention=gqa, layer_attention=(), num_layers=2, state_layers=())
    dsv3 = SimpleNamespace(attention=mla, layer_attention=(), num_layers=2, state_layers=())
    hybrid = SimpleNamespace(attention=gqa, layer_attention=(linear, gqa), num_layers=2, state_layers=(0,),
                             attention_for=lambda i: (linear, gqa)[i])
    gqa_state = SimpleNamespace(attention=gqa, layer_attention=(), num_layers=2, state_layers=(0,))

    def sizes(name, cfg=qwen3, ep=None, quantized=False, tp_size=1):
        return graph_sizes_to_capture((1, 2), KernelsName(name), ep, False, EagerReplay(), torch.device("cpu"),
                                      quantized, cfg=cfg, tp_size=tp_size)

    assert sizes("batch_invariant_triton") == (1, 2)
    assert sizes("triton") == (1, 2)
    refused = [(("reference",), {}, "the reference kernels read host-side lengths"),
               (("batch_invariant",), {}, "the batch_invariant kernels read host-side lengths"),
               (("batch_invariant_triton",), dict(cfg=dsv3), "GQA attention only; mla attention"),
               (("batch_invariant_triton",), dict(cfg=hybrid), "GQA attention only; linear attention"),
               (("batch_invariant_triton",), dict(cfg=gqa_state), "per-sequence state ops"),
               (("batch_invariant_triton",), dict(ep=object()), "expert-parallel combine"),
               (("batch_invariant_triton",), dict(tp_size=2), "tensor-parallel sums"),
               (("batch_invariant_triton",), dict(quantized=True), "quantized weights on the plain-torch references")]
    for args, kw, why in refused:
        caplog.clear()
        assert sizes(*args, **kw) == (), (args, kw)
        assert why in caplog.text, (args, kw, caplog.text)
