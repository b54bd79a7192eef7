"""LoRA adapters over several ranks (Ray, CPU ranks, world 2): under EP 2 (DP attention: each rank runs its own
requests' adapters on its attention linears) and TP 2 (each rank its shards: q/k/v's rows of B, o_proj's columns of
A, the delta summed with the partial output), a batch mixing two peft adapters and the base gives one rank's greedy
tokens; a routed-expert adapter is refused there, naming the field (docs/lora.md#limits)."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, LoRARequest, SamplingParams

from tests.helpers.parity import prompts
from tests.helpers.tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.slow

KW = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=4,
          enable_lora=True, max_loras=2, max_lora_rank=8)
NAME = "qwen3_e6k3"


def _adapter(base: str, out: str, seed: int, **fields) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64),
                           LoraConfig(init_lora_weights=False, **fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    return out


def _greedy(llm, ps, loras):
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False, lora_request=loras)]


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 1)])
def test_mixed_adapters_equal_one_rank(local_ray, tiny_model, tmp_path, tp, ep):
    base = tiny_model(NAME)
    a = LoRARequest("a", 1, _adapter(base, str(tmp_path / "a"), 1, r=4, lora_alpha=8,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    b = LoRARequest("b", 2, _adapter(base, str(tmp_path / "b"), 2, r=2, lora_alpha=2, target_modules=["o_proj"]))
    routed = LoRARequest("r", 3, _adapter(base, str(tmp_path / "r"), 3, r=2, lora_alpha=2,
                                          target_modules=["gate_proj", "up_proj", "down_proj"]))
    ps = prompts(TINY_CONFIGS[NAME]["vocab_size"], seed=3, n=3, lo=1, hi=20)
    all_ps = ps * 3
    loras = [a] * len(ps) + [b] * len(ps) + [None] * len(ps)
    one = LLM(base, **KW)
    try:
        want = _greedy(one, all_ps, loras)
    finally:
        one.shutdown()
    assert want[:len(ps)] != want[-len(ps):], "adapter a does not move the greedy tokens: a weak test"
    llm = LLM(base, tensor_parallel_size=tp, expert_parallel_size=ep, **KW)
    try:
        assert _greedy(llm, all_ps, loras) == want
        flag = "tensor_parallel_size=2" if tp > 1 else "expert_parallel_size=2"
        with pytest.raises(ValueError, match=f"target_parameters=.* not supported with {flag}"):
            llm.generate(ps[:1], use_tqdm=False, lora_request=routed)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()


def test_tp2_mla_adapter_equals_one_rank(local_ray, tmp_path):
    """DeepSeek-V3 at TP 2: MLA's q_b_proj is column-parallel in the rope de-interleave order (B read at this
    rank's rows of that order), kv_a a whole piece beside q_a, o_proj row-parallel (A at this rank's columns)."""
    from moelink.engine.tools.tiny_model import make_tiny_model

    base = str(make_tiny_model(tmp_path / "base", "deepseek_v3", dtype="float64"))
    a = LoRARequest("mla", 1, _adapter(base, str(tmp_path / "mla"), 4, r=4, lora_alpha=8,
                                       target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"]))
    ps = prompts(200, seed=5, n=2, lo=2, hi=15)
    loras = [a] * len(ps) + [None] * len(ps)
    one = LLM(base, **KW)
    try:
        want = _greedy(one, ps * 2, loras)
    finally:
        one.shutdown()
    assert want[:len(ps)] != want[len(ps):], "the adapter does not move the greedy tokens: a weak test"
    llm = LLM(base, tensor_parallel_size=2, **KW)
    try:
        assert _greedy(llm, ps * 2, loras) == want
    finally:
        llm.engine.shutdown()
