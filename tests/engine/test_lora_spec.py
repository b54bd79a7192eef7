"""LoRA with speculative decoding (docs/lora.md, Speculative decoding) against transformers + peft in float64: the
drafter runs without the adapter, the verify step's 1 + k rows of a request carry its adapter's slot, so greedy
output is the adapter's own, drafts accepted or not. A tiny Qwen3-MoE with two adapters (attention; the routed
experts) and the base interleaved under the n-gram drafter (k=2, repetitive prompts: drafts are accepted), and a
tiny DeepSeek-V3 with its MTP layer (a device drafter) under an adapter on MLA's q_b_proj, and a Qwen3-MoE with an
EAGLE-3 head under a q/v adapter."""
from __future__ import annotations

import random

import pytest

from tests.helpers.lora_peft import make_adapter, peft_greedy

MAX_NEW = 12


def _repetitive(vocab: int, seed: int, n: int) -> list[list[int]]:
    """Prompts that repeat a short unit: the n-gram drafter finds its matches in them and in what follows."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        unit = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 4))]
        out.append((unit * 6)[: rng.randint(8, 16)])
    return out


def _generate(llm, prompts, loras) -> list[list[int]]:
    from moelink.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False, lora_request=loras)]


@pytest.mark.slow  # over 1 s (peft oracle and an engine)
def test_ngram_drafts_with_two_adapters_and_the_base_interleaved_equal_peft(tmp_path):
    from moelink.engine import LLM, LoRARequest
    from moelink.engine.tools.tiny_model import make_tiny_model

    base = str(make_tiny_model(tmp_path / "base", "qwen3_moe", dtype="float64", num_layers=2, mlp_only_layers=[0]))
    adapters = {"attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                "experts": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])}
    reqs = {None: None}
    for i, (name, fields) in enumerate(adapters.items()):
        reqs[name] = LoRARequest(name, i + 1, make_adapter(base, str(tmp_path / name), fields, seed=i + 1))
    ps = _repetitive(200, seed=3, n=2)
    want = {n: peft_greedy(base, r.lora_path if r is not None else None, ps, MAX_NEW) for n, r in reqs.items()}
    assert want["attn"] != want[None] and want["experts"] != want[None], "an adapter that moves nothing: weak test"
    order = [n for p in range(len(ps)) for n in reqs]  # base, attn, experts, base, ... : adapters interleaved
    llm = LLM(base, dtype="float64", enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_blocks=64, block_size=4,
              max_num_batched_tokens=64,
              speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})
    try:
        got = _generate(llm, [ps[i // len(reqs)] for i in range(len(order))], [reqs[n] for n in order])
        stats = llm.engine.stats()
        sd = stats.spec_decode
        # Rejected drafts leave nothing held: every KV block free, no request, no slot held by a request.
        assert stats.num_free_blocks == stats.num_total_blocks and not llm.engine.has_requests()
        assert not llm.engine.executor.worker.runner.requests
    finally:
        llm.shutdown()
    assert got == [want[n][i // len(reqs)] for i, n in enumerate(order)]
    assert sd is not None and sd.num_accepted_tokens > 0, sd  # drafts were verified under the adapters and kept


@pytest.mark.slow  # over 1 s (peft oracle and an engine)
def test_mtp_drafts_under_an_mla_adapter_equal_peft(tmp_path):
    from moelink.engine import LLM, LoRARequest

    from tests.helpers.mtp_checkpoints import VOCAB, bigram_mtp, make_mtp_model

    base = str(bigram_mtp(make_mtp_model(tmp_path / "random", "deepseek_v3"), tmp_path / "bigram"))
    # Small factors: the bigram MTP layer still guesses the adapter's tokens often, so drafts are accepted.
    path = make_adapter(base, str(tmp_path / "mla"), dict(r=4, lora_alpha=8, target_modules=["q_b_proj"]),
                        seed=5)
    ps = _repetitive(VOCAB, seed=4, n=2)
    want = peft_greedy(base, path, ps, MAX_NEW)
    assert want != peft_greedy(base, None, ps, MAX_NEW), "the adapter moves nothing: a weak test"
    llm = LLM(base, dtype="float64", enable_lora=True, max_loras=1, max_lora_rank=4, num_kv_blocks=64, block_size=4,
              max_num_batched_tokens=64, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    try:
        got = _generate(llm, ps, LoRARequest("mla", 1, path))
        sd = llm.engine.stats().spec_decode
    finally:
        llm.shutdown()
    assert got == want
    assert sd is not None and sd.num_accepted_tokens > 0, sd


@pytest.mark.slow  # over 1 s (peft oracle and an engine)
def test_eagle3_drafts_under_an_attention_adapter_equal_peft(tmp_path):
    """An EAGLE-3 head (tests.helpers.eagle3_heads.bigram_head over a scaled Qwen3-MoE) reads the main model's
    auxiliary layers' states, the adapter's; its own layer runs no adapter. Greedy equals peft, drafts accepted."""
    from moelink.engine import LLM, LoRARequest
    from moelink.engine.tools.tiny_model import make_tiny_model

    from tests.helpers.eagle3_heads import bigram_head, scaled_target

    src = make_tiny_model(tmp_path / "src", "qwen3_moe", dtype="float64", num_layers=2, mlp_only_layers=[0])
    base = str(scaled_target(src, tmp_path / "base"))
    head = str(bigram_head(base, tmp_path / "head", aux_layer_ids=[0, 0, 1]))
    path = make_adapter(base, str(tmp_path / "q"), dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                        seed=6)
    ps = _repetitive(200, seed=6, n=2)
    want = peft_greedy(base, path, ps, MAX_NEW)
    assert want != peft_greedy(base, None, ps, MAX_NEW), "the adapter moves nothing: a weak test"
    llm = LLM(base, dtype="float64", enable_lora=True, max_loras=1, max_lora_rank=4, num_kv_blocks=64, block_size=4,
              max_num_batched_tokens=64, speculative_config={"method": "eagle3", "model": head,
                                                             "num_speculative_tokens": 2})
    try:
        got = _generate(llm, ps, LoRARequest("q", 1, path))
        sd = llm.engine.stats().spec_decode
    finally:
        llm.shutdown()
    assert got == want
    assert sd is not None and sd.num_accepted_tokens > 0, sd
