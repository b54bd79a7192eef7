"""Rollout routing replay's other half (issue 58 item 3; SamplingParams.forced_routed_experts, moe/routing_replay.py,
engine/rl/routing_replay.py): a prefill told which experts its prompt's tokens use in every MoE layer.

- Replaying the routing a request was recorded with (return_routed_experts) gives the same tokens and prompt
  logprobs (Qwen3-MoE's softmax router; DeepSeek-V3's grouped sigmoid router with its correction bias).
- Other routing changes the output exactly as it says: prompt logprobs equal transformers' own forward in float64 with
  each layer's router made to pick those experts (weights: its softmax scores at them, renormalised), with some rows
  left to the router (-1) and the last prompt positions not given; chunked beside other requests.
- Its KV is shared only with requests giving the same routing (the cache salt), and bad input is refused naming it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moelink.engine import LLM, SamplingParams

from tests.helpers.parity import assert_pool_free, prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

KW = dict(dtype="float64", max_num_seqs=8, max_num_batched_tokens=24, num_kv_blocks=128, block_size=8)


def _recorded(llm, prompt):
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                return_routed_experts=True, prompt_logprobs=1), use_tqdm=False)[0]
    return out, np.asarray(out.outputs[0].routed_experts)


def _plp(out, prompt):
    return [out.prompt_logprobs[p][t].logprob for p, t in enumerate(prompt) if p]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen3_e6k3", "dsv3_lora"])
def test_replaying_the_recorded_routing_gives_the_same_output(model, tiny_model, hf_tiny_model):
    path = tiny_model(model) if model == "qwen3_e6k3" else hf_tiny_model(model)
    target = prompts(128, seed=71, n=2, lo=40, hi=40)[0]
    llm = LLM(path, enable_return_routed_experts=True, **KW)
    try:
        out, routed = _recorded(llm, target)
        given = routed[: len(target)]
        replayed = llm.generate(prompts(128, seed=72, n=3, lo=5, hi=30) + [target], [SamplingParams(max_tokens=2)] * 3 +
                                [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=1,
                                                return_routed_experts=True, forced_routed_experts=given)],
                                use_tqdm=False)[-1]
        assert replayed.outputs[0].token_ids == out.outputs[0].token_ids
        np.testing.assert_allclose(_plp(replayed, target), _plp(out, target), rtol=0, atol=1e-12)
        assert np.array_equal(np.asarray(replayed.outputs[0].routed_experts)[: len(target)], given)
        assert_pool_free(llm)
    finally:
        llm.shutdown()


def _hf_forced_prompt_logprobs(path: str, prompt: list[int], given: np.ndarray) -> list[float]:
    """transformers' Qwen3-MoE forward in float64 with each layer's router picking `given` [n, L, K] for the first n
    positions (a row of -1: its own top-k); the prompt tokens' logprobs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    forced = torch.full((len(prompt),) + given.shape[1:], -1, dtype=torch.long)
    forced[: len(given)] = torch.from_numpy(given).long()
    for layer_idx, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate

        def forward(hidden_states, gate=gate, layer_idx=layer_idx):
            logits = torch.nn.functional.linear(hidden_states.reshape(-1, gate.hidden_dim), gate.weight)
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            top, ids = torch.topk(probs, gate.top_k, dim=-1)
            mine = forced[:, layer_idx]
            use = (mine[:, :1] >= 0)
            ids = torch.where(use, mine, ids)
            top = torch.where(use, probs.gather(1, ids), top)
            if gate.norm_topk_prob:
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), ids
        gate.forward = forward
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, :-1]
    lp = torch.log_softmax(logits.float(), dim=-1)
    return [lp[p - 1, t].item() for p, t in enumerate(prompt) if p]


@pytest.mark.slow
def test_given_routing_changes_the_output_as_transformers_forced_to_it_does(tiny_model):
    path = tiny_model("qwen3_e6k3")
    target = prompts(128, seed=73, n=2, lo=45, hi=45)[0]
    llm = LLM(path, enable_return_routed_experts=True, **KW)
    try:
        _, routed = _recorded(llm, target)
        E = 6
        given = routed[: len(target) - 5].astype(np.int32)  # the last five prompt positions route on their own
        given[::3] = (given[::3] + 1) % E  # every third position: each of its experts moved to the next one
        given[7] = -1  # this one: its router's choice in every layer
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=1,
                                return_routed_experts=True, forced_routed_experts=given)
        outs = llm.generate(prompts(128, seed=74, n=3, lo=5, hi=30) + [target], [SamplingParams(max_tokens=2)] * 3
                            + [params], use_tqdm=False)
        got = _plp(outs[-1], target)
        want = _hf_forced_prompt_logprobs(path, target, given)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # logprobs are float32 (vLLM's)
        plain = _plp(_recorded(llm, target)[0], target)
        assert max(abs(a - b) for a, b in zip(got, plain)) > 1e-3  # the routing given did change the output
        recorded = np.asarray(outs[-1].outputs[0].routed_experts)
        rows = [p for p in range(len(given)) if given[p, 0, 0] >= 0]
        assert np.array_equal(recorded[rows], given[rows])  # what it ran is what the capture says
        # Its KV is its own: the same prompt without the routing takes no prefix-cache hit of it, with it does.
        llm.flush_cache()
        short = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, forced_routed_experts=given)
        first = llm.generate([target], short, use_tqdm=False)[0]
        plain = llm.generate([target], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)[0]
        again = llm.generate([target], short, use_tqdm=False)[0]
        assert plain.num_cached_tokens == 0 and again.num_cached_tokens > 0
        assert again.outputs[0].token_ids == first.outputs[0].token_ids == outs[-1].outputs[0].token_ids
        assert_pool_free(llm)
    finally:
        llm.shutdown()


def test_bad_given_routing_is_refused_naming_the_field(tiny_model):
    llm = LLM(tiny_model("qwen3_e6k3"), **KW)
    try:
        prompt = list(range(1, 11))
        L, K = len(llm.engine.config.model.sparse_layers), llm.engine.config.model.top_k
        cases = [
            (np.zeros((11, L, K), dtype=np.int64), r"shape \(11, .*must be \[n <= 10 prompt positions"),
            (np.zeros((3, L + 1, K), dtype=np.int64), r"MoE layers"),
            (np.full((3, L, K), 6), r"holds expert 6: this model's expert ids are 0 to 5"),
        ]
        for given, match in cases:
            with pytest.raises(ValueError, match=match):
                llm.generate([prompt], SamplingParams(forced_routed_experts=given), use_tqdm=False)
        with pytest.raises(ValueError, match="SamplingParams.forced_routed_experts=.*integer array"):
            SamplingParams(forced_routed_experts=[[1.5]])
        bad_row = np.zeros((2, L, K), dtype=np.int64)
        bad_row[0, 0, 0] = -1
        with pytest.raises(ValueError, match="a whole row of -1"):
            SamplingParams(forced_routed_experts=bad_row)
        assert_pool_free(llm)
    finally:
        llm.shutdown()
