"""Rollout routing replay's record (`enable_return_routed_experts`, SamplingParams.return_routed_experts; moe/
routing_capture.py): each request's CompletionOutput.routed_experts [prompt + generated - 1, MoE layers, top_k] equals
the top-k ids transformers' own routers pick (forward hooks) on the whole sequence in float64, on Qwen3-MoE and on
DeepSeek-V3 (grouped routing with the correction bias, a dense first layer), over chunked prefills beside other
requests, under preemption, and after the same prompt filled the prefix cache (the request computes its prompt
itself); refused without the flag, and under TP x EP, naming them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moelink.engine import LLM, SamplingParams

from tests.helpers.parity import assert_pool_free, prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


def _hf_routed(path: str, seq: list[int]) -> np.ndarray:
    """transformers' top-k ids of every router on `seq`'s forward: [len(seq), MoE layers, top_k]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    picked: list[torch.Tensor] = []
    routers = [m for m in model.modules() if type(m).__name__.lower().endswith("router")]
    assert routers, "no router modules found"
    hooks = [r.register_forward_hook(lambda _m, _i, out: picked.append(out[-1].reshape(len(seq), -1)))
             for r in routers]
    try:
        with torch.no_grad():
            model(torch.tensor([seq]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(picked, dim=1).numpy()


def _assert_routed(got: np.ndarray, path: str, prompt: list[int], output: list[int]) -> None:
    seq = prompt + output[:-1]  # every position the engine forwarded
    want = _hf_routed(path, seq)
    assert got.shape == want.shape, (got.shape, want.shape)
    # The same experts per (position, layer); the order within a top-k is the kernel's.
    np.testing.assert_array_equal(np.sort(got, axis=-1), np.sort(want, axis=-1))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen3_e6k3", "dsv3_lora"])
def test_routed_experts_equal_transformers_routers(model, tiny_model, hf_tiny_model):
    path = tiny_model(model) if model == "qwen3_e6k3" else hf_tiny_model(model)
    ps = prompts(128, seed=47, n=5, lo=3, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=128, block_size=8,
              enable_return_routed_experts=True)
    plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm.generate([ps[1]], plain, use_tqdm=False)  # its prompt now in the prefix cache
    asked = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, return_routed_experts=True)
    outs = llm.generate(ps, [asked, asked, plain, asked, plain], use_tqdm=False)
    assert outs[1].num_cached_tokens == 0, "a request asking for routed experts took a prefix-cache hit"
    for i in (0, 1, 3):
        comp = outs[i].outputs[0]
        _assert_routed(comp.routed_experts, path, ps[i], comp.token_ids)
    assert outs[2].outputs[0].routed_experts is None and outs[4].outputs[0].routed_experts is None
    assert_pool_free(llm)


@pytest.mark.slow
def test_routed_experts_under_preemption(tiny_model):
    path = tiny_model("qwen3_e6k3")
    ps = prompts(128, seed=53, n=6, lo=30, hi=80)
    llm = LLM(path, dtype="float64", max_num_seqs=6, max_num_batched_tokens=48, num_kv_blocks=30, block_size=8,
              enable_return_routed_experts=True)
    outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True,
                                           return_routed_experts=True), use_tqdm=False)
    assert llm.engine.stats().num_preemptions_total > 0
    for p, o in zip(ps, outs):
        _assert_routed(o.outputs[0].routed_experts, path, p, o.outputs[0].token_ids)
    assert_pool_free(llm)


def test_refused_without_the_flag_and_under_tp_times_ep(tiny_model):
    path = tiny_model("qwen3_e6k3")
    llm = LLM(path, dtype="float32", num_kv_blocks=16, block_size=8)
    with pytest.raises(ValueError, match="return_routed_experts=True is invalid.*enable_return_routed_experts"):
        llm.generate([[1, 2, 3]], SamplingParams(return_routed_experts=True), use_tqdm=False)
    with pytest.raises(ValueError, match="enable_return_routed_experts is not supported with tensor_parallel_size=2"):
        LLM(path, tensor_parallel_size=2, expert_parallel_size=2, enable_return_routed_experts=True)
    with pytest.raises(ValueError, match="return_routed_experts"):
        SamplingParams(return_routed_experts=1)
