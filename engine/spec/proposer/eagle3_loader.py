"""Load an EAGLE-3 draft head (engine/spec/heads/eagle3.py) from its own checkpoint directory: config.json
(engine/config/eagle3.py) and safetensors files in the published layout.

Before any tensor is read, the checkpoint's inventory is checked against the head's weight plan: a missing
tensor, one the format does not have, a shape config.json does not give, or a dtype of the wrong kind (d2t
integer, t2d bool, the rest float) is refused in one error naming every such tensor. Which optional tensors a
head holds (its own embedding and head, d2t, t2d) follows from their presence, as vLLM and SGLang load them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...config.eagle3 import Eagle3Config, read_eagle3_config
from ..heads.eagle3 import Eagle3Head
from ...rank.dummy_weights import DummyCheckpoint, TensorSpec
from ...rank.loader import SafetensorsCheckpoint, load_plan

# safetensors dtype names by kind (safe_open's get_slice(name).get_dtype()).
_INTEGER = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}
_FLOAT = {"F16", "BF16", "F32", "F64"}


def _expected(head: Eagle3Head) -> dict[str, tuple[tuple[int, ...], set[str], str]]:
    """Name → (shape, allowed safetensors dtypes, what they are called) of every tensor the head reads."""
    out = {}
    for name, (dest, idx, _) in head.weight_plan().items():
        shape = tuple(dest[idx].shape if idx else dest.shape)
        kinds = {"d2t": (_INTEGER, "an integer"), "t2d": ({"BOOL"}, "bool")}.get(name, (_FLOAT, "a float"))
        out[name] = (shape, *kinds)
    return out


def check_inventory(path: str | Path, ckpt: SafetensorsCheckpoint, head: Eagle3Head) -> None:
    """One ValueError naming every missing, unexpected, misshapen or mistyped tensor (module docstring)."""
    expected = _expected(head)
    names = set(ckpt.keys())
    problems = [f"missing {n!r}" for n in sorted(set(expected) - names)]
    problems += [f"unexpected {n!r} (not a tensor of the EAGLE-3 format)" for n in sorted(names - set(expected))]
    present = sorted(set(expected) & names)
    for st, group in ckpt.open(present):
        for name in group:
            info = st.get_slice(name)
            shape, dtype = tuple(info.get_shape()), info.get_dtype()
            want_shape, dtypes, kind = expected[name]
            if shape != want_shape:
                problems.append(f"{name!r} has shape {shape}, config.json gives {want_shape}")
            if dtype not in dtypes:
                problems.append(f"{name!r} is {dtype}, must be {kind} tensor")
    if problems:
        raise ValueError(f"EAGLE-3 head checkpoint {str(path)!r}: " + "; ".join(problems) + ".")


def load_eagle3_head(path: str | Path, kernels, device: torch.device, *, dtype: torch.dtype, kv_cache_index: int,
                     embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
                     max_positions: int | None = None, config: Eagle3Config | None = None) -> Eagle3Head:
    """The head in directory `path`, every tensor checked and loaded, in eval mode. `embed_tokens` / `lm_head`:
    the target's [V, D] tables, needed only where the checkpoint has no copy of its own; `kv_cache_index`,
    `max_positions`: as Eagle3Head. `config`: the already-read config.json (default: read it)."""
    cfg = config if config is not None else read_eagle3_config(path)
    ckpt = SafetensorsCheckpoint(path)
    head = Eagle3Head(cfg, kernels, device, dtype=dtype, kv_cache_index=kv_cache_index,
                      checkpoint_names=frozenset(ckpt.keys()), embed_tokens=embed_tokens, lm_head=lm_head,
                      max_positions=max_positions)
    check_inventory(path, ckpt, head)
    load_plan(ckpt, head.weight_plan(), device)
    head.process_weights_after_loading()
    return head.eval()


def dummy_eagle3_head(cfg: Eagle3Config, kernels, device: torch.device, *, dtype: torch.dtype, kv_cache_index: int,
                      embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
                      max_positions: int | None = None) -> Eagle3Head:
    """A random head of config.json `cfg` (load_format "dummy", engine/rank/dummy_weights.py's values): its own
    embedding only when the target's is not its width, its own LM head and d2t only with a draft vocabulary; d2t
    stays zero, the identity onto the first draft_vocab_size target ids (a valid map, meaningless drafts)."""
    names = set()
    if cfg.target_hidden_size != cfg.hidden_size or embed_tokens is None:
        names.add("embed_tokens.weight")
    if cfg.draft_vocab_size != cfg.vocab_size or lm_head is None:
        names.add("lm_head.weight")
    if cfg.draft_vocab_size != cfg.vocab_size:
        names.add("d2t")
    head = Eagle3Head(cfg, kernels, device, dtype=dtype, kv_cache_index=kv_cache_index, checkpoint_names=names,
                      embed_tokens=embed_tokens, lm_head=lm_head, max_positions=max_positions)
    plan = {n: e for n, e in head.weight_plan().items() if n != "d2t"}
    specs = {n: TensorSpec(shape, dtype) for n, (shape, _, _) in _expected(head).items() if n in plan}
    load_plan(DummyCheckpoint(specs, device), plan, device)
    head.process_weights_after_loading()
    return head.eval()
