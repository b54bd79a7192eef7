"""LoRA adapters under expert parallelism (Ray, CPU ranks, world 2; DP attention: each rank runs its own requests'
adapters on its attention linears): a batch mixing two peft adapters and the base gives one rank's greedy tokens;
a routed-expert adapter is refused at EP 2, naming the field (docs/lora.md#limits)."""
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


def test_ep2_mixed_adapters_equal_one_rank(local_ray, tiny_model, tmp_path):
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
    llm = LLM(base, expert_parallel_size=2, **KW)
    try:
        assert _greedy(llm, all_ps, loras) == want
        with pytest.raises(ValueError, match="target_parameters=.* not supported with expert_parallel_size=2"):
            llm.generate(ps[:1], use_tqdm=False, lora_request=routed)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()
