"""Weights while serving (SGLang's `update_weights_from_disk`; docs/rl.md): a checkpoint of the same architecture
with new values, written in place into every rank's weights.

Driver side, before any rank writes (`check_same_tensors`): the new checkpoint's tensors are the served one's, name
for name, shape for shape, dtype for dtype (its safetensors headers: nothing read), so no copy can fail half way on
a shape; one error names the first difference otherwise, and the served weights are untouched. The new checkpoint is
a request's: its headers and index are read within bounds the served checkpoint sets (`update_bounds`), and only
files inside its directory (engine/config/checkpoint_files.py); a served engine runs this check on a thread of its
own, never the engine's (engine/api/rl_calls.py).

Rank side (engine/rank/loader.update_in_place): the rank's own plan (its experts under EP, its TP shard: the same plan the
load used, engine/rank/loader.model_plan) over the new checkpoint, one tensor at a time into the tensors the model
already holds: no second copy of the weights, and the addresses CUDA graphs captured stay valid. What a module
converts after its load (a zero-centred norm's offset, MLA's folded scales: engine/models/blocks/checkpoint.py) is
converted again for the parameters written, and only those.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..config.checkpoint_files import HeaderBounds
from ..config.checkpoint_headers import bounds_like, checkpoint_tensors, text_model_name
from ..config.model import ModelConfig
from ..contract.weight_sync import Requant
from .requantize import requantizable, requantize

if TYPE_CHECKING:
    import torch


def _tensors(model_dir: str, text_prefix: str, bounds: HeaderBounds | None = None) -> dict[str, tuple]:
    """{name as the model plans it: (dtype, shape)} from the checkpoint's headers (read within `bounds`)."""
    out = {}
    for real, entry in checkpoint_tensors(model_dir, bounds).items():
        name = text_model_name(real, text_prefix) if text_prefix else real
        if name is not None:
            out[name] = (entry.get("dtype"), tuple(entry.get("shape", ())))
    return out


def served_names(cfg: ModelConfig, served_dir: str) -> set[str]:
    """The names of the served checkpoint's tensors (as the model plans them)."""
    return set(_tensors(served_dir, cfg.text_weights_prefix))


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def check_named_tensors(cfg: ModelConfig, served_dir: str, named_tensors) -> dict:
    """A trainer's tensors ([(name, tensor)]) as {name: tensor}, each a tensor of the served checkpoint with its shape;
    a float one may come in another float dtype (cast as it is written). One error naming the first bad entry."""
    import torch

    served = _tensors(served_dir, cfg.text_weights_prefix)
    requant = requantizable(cfg.quantization, served)  # quantized weights a float tensor is quantized into
    out: dict = {}
    given: set[str] = set()
    named_tensors = list(named_tensors)
    all_names = {item[0] for item in named_tensors if isinstance(item, (tuple, list)) and item}
    for i, item in enumerate(named_tensors):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise ValueError(f"named_tensors[{i}] is invalid: must be a (name, torch.Tensor) pair.")
        name, t = item
        if name in given:
            raise ValueError(f"named_tensors[{i}] names {name!r} a second time.")
        given.add(name)
        if name in requant and not _own_format(t.dtype, served.get(name)):
            spec = requant[name]
            other = _given_part(name, spec, all_names)
            if other is not None:
                raise ValueError(f"named_tensors[{i}] {name!r} is float and its {_part(other)} {other!r} is given "
                                 f"too: send the float weight alone (it is quantized here into {spec.fmt}) or all "
                                 "its parts in their own format.")
            try:
                out.update(requantize(name, spec, t.detach()))
            except ValueError as exc:
                raise ValueError(f"named_tensors[{i}]: {exc}") from None
            continue
        if name not in served:
            raise ValueError(f"named_tensors[{i}] names {name!r}, which is not a tensor of the served checkpoint.")
        dtype, shape = served[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"named_tensors[{i}] {name!r} has shape {list(t.shape)}, the served one {list(shape)}.")
        if dtype not in _FLOAT_DTYPES and str(t.dtype) != str(_TORCH_NAMES.get(dtype)):
            raise ValueError(f"named_tensors[{i}] {name!r} is {t.dtype}, the served one {dtype}: a quantized tensor is "
                             "updated in its own format, or sent in float under the float checkpoint's name "
                             "(re-quantized: FP8 block-scaled, MXFP4, NVFP4, INT4 (compressed-tensors, GPTQ, AWQ)).")
        if dtype in _FLOAT_DTYPES and not t.is_floating_point():
            raise ValueError(f"named_tensors[{i}] {name!r} is {t.dtype}: the served one is float ({dtype}).")
        if dtype in _FLOAT_DTYPES and not bool(torch.isfinite(t).all()):  # host sync: checked before any rank writes
            nan = int(torch.isnan(t).sum())  # (an inf too: the ranks' loader refuses both, part way)
            raise ValueError(f"named_tensors[{i}] {name!r} holds " + (f"{nan} NaN value(s)." if nan else
                                                                      f"{int(torch.isinf(t).sum())} infinite value(s)."))
        out[name] = t.detach()
    if not out:
        raise ValueError("named_tensors is empty: give at least one (name, tensor) pair.")
    return out


def _sent_float(dtype) -> bool:
    """A float tensor a quantized weight is re-quantized from (an FP8 one is the FP8 format's own)."""
    import torch

    return dtype.is_floating_point and dtype != torch.float8_e4m3fn


def _own_format(dtype, served: tuple | None) -> bool:
    """A tensor sent under a served quantized name in that tensor's own dtype (FP8 values, NVFP4's packed bytes):
    written as it is, not re-quantized."""
    return served is not None and str(dtype) == _TORCH_NAMES.get(served[0])


def _given_part(name: str, spec: Requant, names) -> str | None:
    """A served part of `spec` other than `name` itself that the update names too (a float weight beside its own
    quantized parts), or None."""
    return next((n for n in spec.names if n != name and n in names), None)


def _part(served: str) -> str:
    return "scale" if "scale" in served.rsplit(".", 1)[-1] else "part"


_TORCH_NAMES = {"F8_E4M3": "torch.float8_e4m3fn", "U8": "torch.uint8", "I8": "torch.int8", "I32": "torch.int32",
                "I64": "torch.int64"}


def _not_a_checkpoint(new_dir: str) -> ValueError:
    """One error for a path that is missing, not a directory, unreadable or holds no safetensors tensors: the answer
    must not tell a client which directories exist on the server (issue 76)."""
    cut = "..." if len(new_dir) > 200 else ""  # a client's string, bounded (engine/contract/safe_text.py's rule)
    return ValueError(f"model_path={new_dir[:200]!r}{cut} is invalid: not a directory holding a readable safetensors "
                      "checkpoint.")


def served_tensors(cfg: ModelConfig, served_dir: str) -> tuple[dict[str, tuple], HeaderBounds]:
    """The served checkpoint's tensors ({name: (dtype, shape)}) and the bounds an update's headers are read within
    (twice the served checkpoint's: engine/config/checkpoint_headers.bounds_like); the engine reads them once."""
    return _tensors(served_dir, cfg.text_weights_prefix), bounds_like(served_dir)


def check_same_tensors(cfg: ModelConfig, served_dir: str, new_dir: str,
                       served: tuple[dict[str, tuple], HeaderBounds] | None = None) -> None:
    """Refuse, naming the first difference, a checkpoint whose tensors are not the served one's (names, shapes,
    dtypes): an update changes values, not the architecture. Its headers are read within the served checkpoint's
    bounds, its files inside its directory. `served`: served_tensors' answer, where the caller keeps it."""
    if not os.path.isdir(new_dir):  # False for a name too long, or with a NUL byte, too
        raise _not_a_checkpoint(new_dir)
    prefix = cfg.text_weights_prefix
    served_map, bounds = served if served is not None else served_tensors(cfg, served_dir)
    try:
        new = _tensors(new_dir, prefix, bounds)
    except OSError:  # a directory it may not list or enter
        raise _not_a_checkpoint(new_dir) from None
    except ValueError as exc:  # the checkpoint's own error names it (and never another file's content)
        raise ValueError(f"model_path is invalid: {exc}") from None
    _check_same(new_dir, served_map, new)


def _check_same(new_dir: str, served: dict[str, tuple], new: dict[str, tuple]) -> None:
    if not new:
        raise _not_a_checkpoint(new_dir)
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


def _dtype(value) -> "torch.dtype | None":
    """A torch dtype from a torch.dtype or its name ("bfloat16", "torch.bfloat16"); None when it is neither."""
    import torch

    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        found = getattr(torch, value.removeprefix("torch."), None)
        return found if isinstance(found, torch.dtype) else None
    return None


def check_tensor_specs(cfg: ModelConfig, served_dir: str, names, dtypes, shapes) -> tuple:
    """A trainer's broadcast as ((name, torch dtype, shape), ...), in its order, each a tensor of the served checkpoint
    with its shape; a float one in any float dtype (cast as it is written), a quantized one in its own, or an FP8
    block-scaled one in float (re-quantized: the second item, ((weight name, scale name), ...)). Checked before any
    tensor is broadcast: one error naming the first bad entry."""
    import torch

    for field, value in (("names", names), ("dtypes", dtypes), ("shapes", shapes)):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{field}={value!r} is invalid: must be a list (one entry per tensor).")
    if not names:
        raise ValueError("names is empty: an update names at least one tensor.")
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names, dtypes and shapes have {len(names)}, {len(dtypes)} and {len(shapes)} entries: "
                         "give one of each per tensor.")
    served = _tensors(served_dir, cfg.text_weights_prefix)
    requant = requantizable(cfg.quantization, served)
    requantized: list[tuple[str, Requant]] = []
    out, seen = [], set()
    for i, (name, dt, shape) in enumerate(zip(names, dtypes, shapes)):
        if not isinstance(name, str) or (name not in served and name not in requant):
            raise ValueError(f"names[{i}]={name!r} is invalid: not a tensor of the served checkpoint.")
        if name in seen:
            raise ValueError(f"names[{i}] names {name!r} a second time.")
        seen.add(name)
        dtype = _dtype(dt)
        if dtype is None:
            raise ValueError(f"dtypes[{i}]={dt!r} (tensor {name!r}) is invalid: must be a torch dtype or its name.")
        if not (isinstance(shape, (list, tuple)) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                         for n in shape)):
            raise ValueError(f"shapes[{i}]={shape!r} (tensor {name!r}) is invalid: must be a list of sizes.")
        if name in requant and not _own_format(dtype, served.get(name)):
            spec = requant[name]
            if not _sent_float(dtype):
                raise ValueError(f"dtypes[{i}]={dt!r} is invalid: tensor {name!r} is quantized into the served "
                                 f"{spec.fmt} weight from a float tensor only.")
            if tuple(shape) != spec.shape:
                raise ValueError(f"shapes[{i}]={list(shape)} is invalid: tensor {name!r} is quantized into the served "
                                 f"{spec.fmt} weight from a float tensor of shape {list(spec.shape)}.")
            other = _given_part(name, spec, names)
            if other is not None:
                raise ValueError(f"names[{i}] names {name!r} in {dt!r} and its {_part(other)} {other!r} too: send the "
                                 f"float weight alone (each rank quantizes it into {spec.fmt}) or all its parts in "
                                 "their own format.")
            requantized.append((name, spec))  # each rank quantizes it as it writes it
            out.append((name, dtype, tuple(shape)))
            continue
        sdtype, sshape = served[name]
        if tuple(shape) != sshape:
            raise ValueError(f"shapes[{i}]={list(shape)} is invalid: tensor {name!r} is {list(sshape)} in the served "
                             "checkpoint.")
        if sdtype in _FLOAT_DTYPES and not dtype.is_floating_point:
            raise ValueError(f"dtypes[{i}]={dt!r} is invalid: tensor {name!r} is float ({sdtype}) in the served "
                             "checkpoint.")
        if sdtype not in _FLOAT_DTYPES and str(dtype) != _TORCH_NAMES.get(sdtype):
            raise ValueError(f"dtypes[{i}]={dt!r} is invalid: tensor {name!r} is {sdtype} in the served checkpoint (a "
                             "quantized tensor is updated in its own format, or sent in float under the float "
                             "checkpoint's name: FP8 block-scaled, MXFP4, NVFP4, INT4 (compressed-tensors, GPTQ, AWQ)).")
        out.append((name, dtype, tuple(shape)))
    return tuple(out), tuple(requantized)
