"""The safetensors headers checked against config.json before anything is allocated from either.

Why here, before the ranks start: a config.json whose shape disagrees with the weights (a typo, a hostile file)
would otherwise size the model first and fail late, after a huge allocation or with a traceback; a file that is
not a regular file (a FIFO named model.safetensors) would block the loader forever; a weight whose header says
an integer dtype would be cast into the model's float weights without a word.

Only headers are read (8 bytes of length, then the JSON header, at most MAX_HEADER_BYTES): no tensor data.
"""
from __future__ import annotations

import json
import os
import re
import stat
import struct
from pathlib import Path

from .dsv4_quant import dsv4_fp4_expert

# safetensors' own reader refuses headers above 100 MB.
MAX_HEADER_BYTES = 100_000_000
# Element types a model weight may have: floats and FP8 (scales are float too). MXFP4 experts are U8, but their
# tensors are `*_blocks` / `*_scales`, not `*.weight`; NVFP4 weights are U8 `*.weight` with a `*.weight_scale_2`
# beside them, allowed when the checkpoint's quantization is NVFP4.
WEIGHT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def read_header(path: Path) -> dict:
    """The JSON header of one safetensors file; ValueError naming the file when it is not one."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"checkpoint file {str(path)!r} cannot be read ({e.strerror}).") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"checkpoint file {str(path)!r} is not a regular file: a safetensors file is required.")
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"checkpoint file {str(path)!r} is not a safetensors file: {st.st_size} bytes, no header.")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > st.st_size:
            raise ValueError(f"checkpoint file {str(path)!r} is not a safetensors file: its header claims {n} bytes "
                             f"(the file has {st.st_size}).")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"checkpoint file {str(path)!r} is not a safetensors file: its header is not JSON "
                             f"({e}).") from None
    if not isinstance(header, dict):
        raise ValueError(f"checkpoint file {str(path)!r} is not a safetensors file: its header is not an object.")
    header.pop("__metadata__", None)
    return header


def checkpoint_tensors(model_dir: str | Path) -> dict[str, dict]:
    """Tensor name → its header entry (dtype, shape), over every safetensors file of the checkpoint."""
    path = Path(model_dir)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text()).get("weight_map", {}).values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    tensors: dict[str, dict] = {}
    for f in files:
        tensors.update(read_header(f))
    return tensors


def text_model_name(real: str, text_prefix: str) -> str | None:
    """A multimodal checkpoint's tensor as the text model names it, or None for another tower's.

    A prefix inside "model." (Qwen3.5-MoE's "model.language_model."): "model.language_model.layers.0..." ->
    "model.layers.0...", other "model." tensors ("model.visual...") are the vision tower's, names outside "model."
    (lm_head) stay. A prefix that wraps a whole causal LM ("X.model.": Kimi K2.5's "language_model.model."): its
    "X.model.*" are the text model's "model.*", the rest of "X." its head ("language_model.lm_head.weight" ->
    "lm_head.weight"), and everything outside "X." another tower's ("vision_tower.*", "mm_projector.*")."""
    if real.startswith(text_prefix):
        return "model." + real[len(text_prefix):]
    if not text_prefix.startswith("model.") and text_prefix.endswith(".model."):
        outer = text_prefix[: -len("model.")]
        return real[len(outer):] if real.startswith(outer) else None
    return None if real.startswith("model.") else real


def check_checkpoint(cfg) -> None:
    """Refuse, in one sentence naming the field or the tensor, a checkpoint whose headers disagree with `cfg`
    (a ModelConfig read from its config.json) where the model would be sized from config.json alone."""
    tensors = checkpoint_tensors(cfg.model)
    if not tensors:
        return  # no safetensors files: the loader says so
    prefix = getattr(cfg, "text_weights_prefix", "")
    if prefix:  # a multimodal checkpoint: its text model's tensors, by the text model's names
        tensors = {n: e for n, e in ((text_model_name(r, prefix), e) for r, e in tensors.items()) if n is not None}
    quant = getattr(cfg, "quantization", None)
    for name, entry in tensors.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if name.endswith(".weight") and dtype == "U8" and name + "_scale_2" in tensors and quant is not None \
                and quant.method == "nvfp4":
            continue  # NVFP4: the experts' format, dequantized at load elsewhere (engine/rank/nvfp4_linears.py)
        if name.endswith(".weight") and dsv4_fp4_expert(name, dtype, tensors, getattr(cfg, "hf_config", None)):
            continue  # DeepSeek-V4's FP4 experts, read packed (engine/config/dsv4_quant.py)
        if name.endswith(".weight") and dtype not in WEIGHT_DTYPES:
            raise ValueError(f"checkpoint tensor {name!r} has dtype {dtype!r} in its header: a weight must be one of "
                             f"{', '.join(WEIGHT_DTYPES)}.")
    embed = tensors.get("model.embed_tokens.weight")
    shape = embed.get("shape") if isinstance(embed, dict) else None
    if isinstance(shape, list) and len(shape) == 2:
        for field, value, held in (("vocab_size", cfg.vocab_size, shape[0]), ("hidden_size", cfg.hidden_size, shape[1])):
            if value != held:
                raise ValueError(f"config.json {field}={value} disagrees with the checkpoint: model.embed_tokens.weight "
                                 f"has shape {shape}.")
    layers = {int(m.group(1)) for m in map(_LAYER.search, tensors) if m}
    if layers and max(layers) + 1 < cfg.num_layers:
        raise ValueError(f"config.json num_hidden_layers={cfg.num_layers} disagrees with the checkpoint: it holds "
                         f"layers 0 to {max(layers)}.")
    experts = {int(m.group(1)) for m in map(_EXPERT.search, tensors) if m}
    if experts and max(experts) + 1 < cfg.num_experts:
        raise ValueError(f"config.json num_experts={cfg.num_experts} (n_routed_experts, num_local_experts) disagrees "
                         f"with the checkpoint: it holds experts 0 to {max(experts)}.")
