"""A trainer's new weights for the weight-update tests (tests/engine/test_weight_updates_*.py, test_openrlhf_compat.py,
tests/server/test_{sglang,vllm}_rl_frameworks.py): a checkpoint's tensors, the same tensors perturbed into a new model,
that model saved beside the original's config and tokenizer (the fresh engine / transformers reference the update is
checked against loads it), and a recorded transcript's "$name" fields filled in."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch


def checkpoint_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of `path`'s *.safetensors files, by name."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(path).glob("*.safetensors")) for k, v in load_file(f).items()}


def perturbed(tensors: dict[str, torch.Tensor], seed: int = 5) -> dict[str, torch.Tensor]:
    """Every tensor plus noise of a tenth of its spread (norms included): a new model, not a new scale, so greedy
    tokens after an update tell the new weights from the old."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * (v.float().std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=g).to(v.dtype)
            for k, v in tensors.items()}


def saved_checkpoint(path: str, tensors: dict[str, torch.Tensor], out: Path) -> str:
    """`path`'s checkpoint with `tensors` as its weights, at `out`: its config and tokenizer files copied, its shards
    (and their index, which would name the old shards) replaced by one model.safetensors."""
    from safetensors.torch import save_file

    out.mkdir()
    for f in Path(path).iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    save_file(tensors, str(out / "model.safetensors"))
    return str(out)


def filled(value, names: dict):
    """A recorded transcript's JSON with each "$name" string replaced by `names[name]` (the model path, the port,
    the tensors' names: what the recording cannot know), lists and dicts walked."""
    if isinstance(value, str) and value.startswith("$"):
        return names[value[1:]]
    if isinstance(value, list):
        return [filled(v, names) for v in value]
    if isinstance(value, dict):
        return {k: filled(v, names) for k, v in value.items()}
    return value
