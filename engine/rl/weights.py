"""Weights while serving (SGLang's `update_weights_from_disk`; docs/rl.md): a checkpoint of the same architecture
with new values, written in place into every rank's weights.

Driver side, before any rank writes (`check_same_tensors`): the new checkpoint's tensors are the served one's, name
for name, shape for shape, dtype for dtype (its safetensors headers: nothing read), so no copy can fail half way on
a shape; one error names the first difference otherwise, and the served weights are untouched.

Rank side (engine/rank/loader.update_in_place): the rank's own plan (its experts under EP, its TP shard: the same plan the
load used, engine/rank/loader.model_plan) over the new checkpoint, one tensor at a time into the tensors the model
already holds: no second copy of the weights, and the addresses CUDA graphs captured stay valid. What a module
converts after its load (a zero-centred norm's offset, MLA's folded scales: engine/models/blocks/checkpoint.py) is
converted again for the parameters written, and only those.
"""
from __future__ import annotations

from pathlib import Path

from ..config.checkpoint_headers import checkpoint_tensors, text_model_name
from ..config.model import ModelConfig


def _tensors(model_dir: str, text_prefix: str) -> dict[str, tuple]:
    """{name as the model plans it: (dtype, shape)} from the checkpoint's headers."""
    out = {}
    for real, entry in checkpoint_tensors(model_dir).items():
        name = text_model_name(real, text_prefix) if text_prefix else real
        if name is not None:
            out[name] = (entry.get("dtype"), tuple(entry.get("shape", ())))
    return out


def check_same_tensors(cfg: ModelConfig, served_dir: str, new_dir: str) -> None:
    """Refuse, naming the first difference, a checkpoint whose tensors are not the served one's (names, shapes,
    dtypes): an update changes values, not the architecture."""
    if not Path(new_dir).is_dir():
        raise ValueError(f"model_path={new_dir!r} is invalid: not a directory.")
    prefix = cfg.text_weights_prefix
    served, new = _tensors(served_dir, prefix), _tensors(new_dir, prefix)
    if not new:
        raise ValueError(f"model_path={new_dir!r} is invalid: it holds no safetensors tensors.")
    missing = sorted(set(served) - set(new))
    if missing:
        raise ValueError(f"model_path={new_dir!r} is missing tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + ": an update must hold every tensor of the served checkpoint.")
    extra = sorted(set(new) - set(served))
    if extra:
        raise ValueError(f"model_path={new_dir!r} holds tensor {extra[0]!r}, which the served checkpoint has not: "
                         "an update changes values, not the architecture.")
    for name in sorted(served):
        if served[name] != new[name]:
            raise ValueError(f"model_path={new_dir!r}: tensor {name!r} is {new[name][0]} {list(new[name][1])}, the "
                             f"served one {served[name][0]} {list(served[name][1])}: an update keeps every tensor's "
                             "dtype and shape.")
