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


def random_adapter(base: str, out: str, targets: tuple[str, ...], r: int, alpha: float, seed: int,
                   experts_down: bool = False, experts_gate_up: bool = False) -> str:
    """An adapter in peft's published layout (adapter_config.json, adapter_model.safetensors: `base_model.model.<module>
    .lora_A.weight` [r, K], `.lora_B.weight` [N, r]) on every linear of `base` whose name ends in one of `targets`, A and
    B random (N(0, 0.3), float32), written without peft: for tests whose oracle is another engine run (the graph tests),
    not peft's math. `experts_down`: on every MoE layer's routed experts' down_proj too (peft's fused-expert layout:
    A [r E, I], B [D, r E], target_parameters); `experts_gate_up`: on their gate_up_proj (A [r E, D], B [2I, r E];
    with both, nested under `base_layer` as peft nests the first of two target_parameters)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from moelink.engine.lora.adapter import model_targets

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    held = model_targets(base)
    for module, (n, k) in sorted(held.linears.items()):
        if module.rsplit(".", 1)[-1] in targets:
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, k, generator=g) * 0.3
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n, r, generator=g) * 0.3
    for module, (e, d, i) in sorted(held.experts.items()) if experts_gate_up else ():
        nested = f"{module}.base_layer" if experts_down else module
        tensors[f"base_model.model.{nested}.lora_A.weight"] = torch.randn(r * e, d, generator=g) * 0.3
        tensors[f"base_model.model.{nested}.lora_B.weight"] = torch.randn(2 * i, r * e, generator=g) * 0.3
    for module, (e, d, i) in sorted(held.experts.items()) if experts_down else ():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r * e, i, generator=g) * 0.3
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(d, r * e, generator=g) * 0.3
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=r, lora_alpha=alpha, target_modules=list(targets),
        target_parameters=(["mlp.experts.gate_up_proj"] if experts_gate_up else [])
        + (["mlp.experts.down_proj"] if experts_down else []))))
    return out
