"""The LoRA tests' oracle: adapters made with peft itself (get_peft_model with random, non-zero A and B, then
save_pretrained) and transformers + peft's greedy tokens in float64 (tests/engine/test_lora.py,
tests/ep/test_ep_lora.py)."""
from __future__ import annotations

import torch


def hf_model(path: str):
    """The checkpoint in transformers, float64, its experts run by the eager loop (what peft wraps)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()


def make_adapter(base: str, out: str, fields: dict, seed: int) -> str:
    """A peft adapter of `fields` (LoraConfig's) over `base`, A and B drawn big enough to move greedy tokens."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(hf_model(base), LoraConfig(init_lora_weights=False, **fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    return out


def peft_greedy(base: str, adapter: str | None, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """transformers + peft's greedy tokens of each prompt under `adapter` (None: the base model)."""
    from peft import PeftModel

    from tests.helpers.fp8_checkpoints import hf_greedy_with

    model = hf_model(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    return hf_greedy_with(model, prompts, max_new)
