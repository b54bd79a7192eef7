"""The fused decode attention input and output in the engine (engine/models/gqa_input.py: the input norm, the q/k/v
GEMV and rope_write_kv as one kernels.norm_qkv_rope_kv launch; o_proj, the residual add and the FFN block's norm as
one kernels.linear_add_rms_norm launch) and the router's (moe/layer.py: the gate GEMV and route_topk as one
kernels.gate_route_topk launch), the Triton kernels in the interpreter: which layers hold them, and a greedy
run that takes them at every small step gives the unfused run's tokens, its logprobs within fp32 rounding (the
GEMVs sum in their own order)."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.models.fused_output import FusedOutput
from moelink.engine.models.gqa_input import FusedInput
from moelink.engine.models.mlp_fusion import FusedMLP
from moelink.kernels.attention_input import MAX_TOKENS
from moelink.moe.fp8_input import Fp8Input

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


def _llm(path, kernels="triton"):
    return LLM(path, dtype="float32", device="cpu", kernels=kernels, max_num_seqs=4, max_num_batched_tokens=64,
               num_kv_blocks=16, block_size=16, enable_prefix_caching=False, skip_warmup=True, enforce_eager=True)


def _mixers(llm):
    return [layer.mixer for layer in llm.engine.executor.worker.runner.model.layers]


def _generate(llm):
    # Both prefills in one step of 24 tokens (past MAX_TOKENS: unfused), then decode steps of two sequences, then
    # of one.
    prompts = [[5, 17, 42, 99, 7], [3 + i for i in range(19)]]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=2) for m in (4, 2)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def _counting(kernels, ops) -> dict[str, list[int]]:
    """Wrap each op of the engine's kernels so that every call records its token count."""
    seen: dict[str, list[int]] = {op: [] for op in ops}

    def wrap(op):
        real = getattr(kernels, op)

        def run(x, *args, **kw):
            seen[op].append(x.shape[0])
            return real(x, *args, **kw)
        return run

    for op in ops:
        setattr(kernels, op, wrap(op))
    return seen


def test_which_layers_hold_the_fused_input(tiny_model):
    """Plain GQA on the Triton kernels holds it; the reference kernels (the CPU path) never do."""
    llm = _llm(tiny_model("qwen3_e6k3"))
    try:
        assert all(isinstance(m.fusion, FusedInput) for m in _mixers(llm))
        assert all(not m.fusion.counters_G.any() for m in _mixers(llm))
    finally:
        llm.shutdown()
    ref = _llm(tiny_model("qwen3_e6k3"), kernels="reference")
    try:
        assert all(m.fusion is None for m in _mixers(ref))
    finally:
        ref.shutdown()


@pytest.mark.slow  # two interpreter engines
def test_fused_run_gives_the_unfused_tokens(tiny_model, monkeypatch):
    path = tiny_model("qwen3_e6k3")
    llm = _llm(path)
    kernels, layers = _mixers(llm)[0].kernels, len(_mixers(llm))
    seen = _counting(kernels, ("norm_qkv_rope_kv", "linear_add_rms_norm", "gate_route_topk"))
    try:
        fused = _generate(llm)
        assert all(not m.fusion.counters_G.any() and not m.fusion.output.counters_T.any()
                   for m in _mixers(llm)), "counters left non-zero"
    finally:
        llm.shutdown()
    # Every decode step, every layer: one of two rows, then two of one (the prefill step's 24 tokens ran unfused).
    # The three launches: the attention's input and output (o_proj, the add and the FFN block's norm), and the
    # router (gate GEMV + top-k; every layer of this model is a MoE layer).
    decode = [2] * layers + [1] * (2 * layers)
    assert seen["norm_qkv_rope_kv"] == seen["linear_add_rms_norm"] == seen["gate_route_topk"] == decode, seen

    monkeypatch.setattr(FusedInput, "takes", lambda self, x_TD: False)
    unfused_llm = _llm(path)
    for layer in unfused_llm.engine.executor.worker.runner.model.layers:
        layer.moe.gate_counters_T = None  # the gate matmul and route_topk apart
    try:
        unfused = _generate(unfused_llm)
    finally:
        unfused_llm.shutdown()
    _same(fused, unfused)
    assert torch.isfinite(torch.tensor([lp.logprob for _, lps in fused for d in lps for lp in d.values()])).all()

    # The input launch with the output apart (forward_fused's post_norm None: what an FP8 handoff, a row-parallel
    # o_proj or an o_proj adapter leave): the same tokens.
    monkeypatch.undo()
    monkeypatch.setattr(FusedOutput, "takes_output", lambda self, x_TD: False)
    half_llm = _llm(path)
    seen = _counting(_mixers(half_llm)[0].kernels, ("norm_qkv_rope_kv", "linear_add_rms_norm"))
    try:
        _same(_generate(half_llm), unfused)
    finally:
        half_llm.shutdown()
    assert seen["norm_qkv_rope_kv"] == decode and not seen["linear_add_rms_norm"], seen


def _same(got_runs, want_runs) -> None:
    """The same tokens, their logprobs within fp32 rounding (the GEMVs sum in their own order)."""
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got_runs, want_runs):
        assert tokens == want_tokens
        for got, want in zip(logprobs, want_logprobs):
            for tok, lp in want.items():
                assert abs(got[tok].logprob - lp.logprob) < 1e-4, (tok, got[tok].logprob, lp.logprob)


@pytest.mark.slow  # two interpreter engines
def test_mla_output_fused_run_gives_the_unfused_tokens(hf_tiny_model, monkeypatch):
    """MLA's fusion is the output launch alone (engine/models/fused_output.py): a DeepSeek-V3-layout checkpoint
    saved by transformers (a dense first layer, then MoE layers with a shared expert and noaux_tc routing) takes it
    at every decode step of every layer, the router launch at every MoE layer's, and the dense MLP's two GEMV
    launches (the shared experts' with the routed sum added in the second), and gives the unfused tokens."""
    path = hf_tiny_model("dsv3_neox")
    llm = _llm(path)
    mixers = _mixers(llm)
    assert all(isinstance(m.fusion, FusedOutput) for m in mixers)
    kernels, layers = mixers[0].kernels, len(mixers)
    moe_layers = sum(layer.moe is not None for layer in llm.engine.executor.worker.runner.model.layers)
    seen = _counting(kernels, ("linear_add_rms_norm", "gate_route_topk", "gate_up_silu_mul", "linear_add"))
    try:
        fused = _generate(llm)
    finally:
        llm.shutdown()
    assert seen["linear_add_rms_norm"] == [2] * layers + [1] * (2 * layers), seen
    assert seen["gate_route_topk"] == [2] * moe_layers + [1] * (2 * moe_layers), seen
    # The dense layer's MLP and every MoE layer's shared experts in two launches each (engine/models/mlp_fusion.py):
    # every layer has one, at every decode step; the prefill's 24 tokens ran the GEMMs.
    assert seen["gate_up_silu_mul"] == seen["linear_add"] == [2] * layers + [1] * (2 * layers), seen
    monkeypatch.setattr(FusedOutput, "takes", lambda self, x_TD: False)
    monkeypatch.setattr(FusedMLP, "takes", lambda self, x_TD: False)
    unfused_llm = _llm(path)
    try:
        for layer in unfused_llm.engine.executor.worker.runner.model.layers:
            if layer.moe is not None:
                layer.moe.gate_counters_T = None
        unfused = _generate(unfused_llm)
    finally:
        unfused_llm.shutdown()
    _same(fused, unfused)


@pytest.mark.slow  # two interpreter engines
def test_fp8_checkpoint_takes_the_fused_launches_w8a8(fp8_tiny, monkeypatch):
    """A Qwen3-MoE checkpoint quantized to FP8 in 16 x 16 blocks (`moelink quantize-fp8`: e4m3 q/k/v, o, the dense
    MLP and the experts with their block scales, a ragged hidden of 40; layer 0 MoE, layer 1 a dense MLP): the
    attention's input and output launches and the dense MLP's two launches read the e4m3 weights and their scales
    at every decode step (W8A8, kernels/triton_gemv.py); before the MoE layer's FP8 experts the output launch also
    writes their quantized input (kernels.linear_add_rms_norm_fp8, the handoff of moe/fp8_input.py); and the run
    gives the unfused run's tokens (the FP8 GEMM, kernels.fp8_linear, with its own activation quantization; the
    norm's own FP8 handoff)."""
    _, path, _ = fp8_tiny("qwen3_fp8")
    llm = _llm(path)
    mixers = _mixers(llm)
    layers_ = llm.engine.executor.worker.runner.model.layers
    assert all(m.qkv_proj.weight.dtype == torch.float8_e4m3fn and isinstance(m.fusion, FusedInput) for m in mixers)
    assert [layer.moe is not None and layer.moe.fp8_input is not None for layer in layers_] == [True, False]
    kernels, layers = mixers[0].kernels, len(mixers)
    ops = ("norm_qkv_rope_kv", "linear_add_rms_norm", "linear_add_rms_norm_fp8", "gate_up_silu_mul", "linear_add")
    scaled: dict[str, list[bool]] = {op: [] for op in ops}
    for op, calls in scaled.items():
        def run(*args, _real=getattr(kernels, op), _calls=calls, **kw):
            _calls.append(kw.get("w_scale_inv") is not None)
            return _real(*args, **kw)
        setattr(kernels, op, run)
    taken: list[bool] = []
    real_take = Fp8Input.take

    def take(self, x_TD):
        got = real_take(self, x_TD)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(Fp8Input, "take", take)
    try:
        fused = _generate(llm)
    finally:
        llm.shutdown()
    monkeypatch.undo()
    # The MoE layer's experts ran on a handed-over quantized copy at every step: the prefill's from the norm, the
    # decode steps' from the output launch.
    assert taken == [True] * 4, taken
    # Three decode steps (two rows, then one, one) a layer: the input launch at both layers, the output launch
    # with the experts' quantized input at the MoE layer, without it at the dense one, whose MLP ran as its two
    # GEMV launches (engine/models/mlp_fusion.py); every call with scales.
    counts = {op: len(calls) for op, calls in scaled.items()}
    assert counts == {"norm_qkv_rope_kv": 3 * layers, "linear_add_rms_norm": 3, "linear_add_rms_norm_fp8": 3,
                      "gate_up_silu_mul": 3, "linear_add": 3}, scaled
    assert all(all(calls) for calls in scaled.values()), scaled
    monkeypatch.setattr(FusedInput, "takes", lambda self, x_TD: False)
    monkeypatch.setattr(FusedMLP, "takes", lambda self, x_TD: False)
    unfused_llm = _llm(path)
    try:
        unfused = _generate(unfused_llm)
    finally:
        unfused_llm.shutdown()
    _same(fused, unfused)
