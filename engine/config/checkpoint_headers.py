"""The safetensors headers checked against config.json before anything is allocated from either.

Why here, before the ranks start: a config.json whose shape disagrees with the weights (a typo, a hostile file)
would otherwise size the model first and fail late, after a huge allocation or with a traceback; a file that is
not a regular file (a FIFO named model.safetensors) would block the loader forever; a weight whose header says
an integer dtype would be cast into the model's float weights without a word.

Only headers are read (8 bytes of length, then the JSON header, at most MAX_HEADER_BYTES), each checked as
safetensors itself checks it (every tensor's bytes inside the data, the data covering the rest of the file: a file
cut short is refused here, naming it, not left to raise safetensors' own error in the loader), and no tensor data
but INT4's `weight_shape` pairs (16 bytes each, compressed-tensors).

A checkpoint a request names (a weight update from disk, engine/rl/weights.py) is read under `HeaderBounds`
(engine/config/checkpoint_files.py: which files, confined to its directory): its headers and tensor count at most
about twice the served checkpoint's (`bounds_like`; an update holds the same tensors), each checked before the bytes
are read or parsed.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from pathlib import Path

from .architectures import REGISTRY
from .checkpoint_files import INDEX_NAME, HeaderBounds, safetensors_files
from .fp4_experts import packed_fp4_expert

# safetensors' own reader refuses headers above 100 MB.
MAX_HEADER_BYTES = 100_000_000
# Element types a model weight may have: floats and FP8 (scales are float too). MXFP4 experts are U8, but their
# tensors are `*_blocks` / `*_scales`, not `*.weight`; NVFP4 weights are U8 `*.weight` with a `*.weight_scale_2`
# beside them, allowed when the checkpoint's quantization is NVFP4.
WEIGHT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
# Bytes per element of the safetensors dtypes a tensor's byte count is checked for (sub-byte ones, F4, are not).
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# INT4 (engine/config/quantization_int4.py): the packed weight of each layout, eight 4-bit values per int32 word.
_INT4_PACKED = {"compressed-tensors": "weight_packed", "gptq": "qweight", "awq": "qweight"}
# A routed expert's linear (compressed-tensors' weight_shape is [out, in]): which config.json sizes make its shape.
_EXPERT_LINEAR = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight_shape$")
_SHAPE_DTYPES = {"I64": "<q", "I32": "<i"}
# What bounds_like allows beyond twice the served checkpoint's own: room for metadata and other file names.
_SLACK_BYTES = 1 << 20
_SLACK_TENSORS = 64


def bounds_like(model_dir: str | Path) -> HeaderBounds:
    """HeaderBounds for a checkpoint that must hold the tensors of the one at `model_dir` (the served checkpoint,
    trusted: the server loaded it): twice its tensors, files, header and index bytes, plus a little."""
    path = Path(model_dir)
    files = safetensors_files(path, None)
    header_bytes = tensors = 0
    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read(8)
        header_bytes += struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
    tensors = len(checkpoint_tensors(path))
    index = path / INDEX_NAME
    index_bytes = index.stat().st_size if index.is_file() else 0
    return HeaderBounds(max_tensors=2 * tensors + _SLACK_TENSORS, max_header_bytes=2 * header_bytes + _SLACK_BYTES,
                        max_index_bytes=2 * index_bytes + _SLACK_BYTES, max_files=2 * len(files) + 8)


def read_header(path: Path) -> dict:
    """The JSON header of one safetensors file; ValueError naming the file when it is not one."""
    return _read_header(path)[0]


def _read_header(path: Path, most: int = MAX_HEADER_BYTES) -> tuple[dict, int]:
    """(read_header's header, the byte at which the file's tensor data starts). `most`: the most header bytes read
    (a bounded read's budget left, checked against the 8-byte length before the header is read)."""
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
        if n > min(most, MAX_HEADER_BYTES) and 8 + n <= st.st_size:
            raise ValueError(f"checkpoint file {str(path)!r} is invalid: its header is larger than a checkpoint "
                             f"header read here may be ({min(most, MAX_HEADER_BYTES)} bytes).")
        if 8 + n > st.st_size:  # the length prefix is the file's first bytes: never quoted
            raise ValueError(f"checkpoint file {str(path)!r} is truncated or not a safetensors file: its header "
                             "length runs past the end of the file.")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"checkpoint file {str(path)!r} is corrupt or not a safetensors file: its header is not "
                             f"JSON ({e}).") from None
    if not isinstance(header, dict):
        raise ValueError(f"checkpoint file {str(path)!r} is not a safetensors file: its header is not an object.")
    header.pop("__metadata__", None)
    _check_offsets(path, header, st.st_size - 8 - n)
    return header, 8 + n


def _check_offsets(path: Path, header: dict, data_bytes: int) -> None:
    """What safetensors checks as it opens a file (its validate): each tensor's data_offsets [begin, end) hold its
    bytes, one after the other from 0, and the last ends where the file does. A file cut short (a partial download or
    copy) fails here: one error naming it, instead of safetensors' own "incomplete metadata" error in the loader."""
    spans = []
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
                and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"checkpoint file {str(path)!r} is corrupt: its header's entry for tensor {name!r} has "
                             f"no valid shape and data_offsets ({entry!r}).")
        begin, end = offsets
        size = _DTYPE_BYTES.get(entry.get("dtype"))
        if end < begin or (size is not None and end - begin != size * math.prod(shape)):
            raise ValueError(f"checkpoint file {str(path)!r} is corrupt: tensor {name!r} ({entry.get('dtype')} "
                             f"{shape}) has data_offsets {offsets}.")
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise ValueError(f"checkpoint file {str(path)!r} is corrupt: tensor {name!r} starts at byte {begin} of "
                             f"the data, where the tensors before it end at {at}.")
        at = end
    if at != data_bytes:
        raise ValueError(f"checkpoint file {str(path)!r} is truncated or corrupt: its header's tensors take {at} "
                         f"bytes of data, the file holds {data_bytes} after the header.")


def checkpoint_tensors(model_dir: str | Path, bounds: HeaderBounds | None = None) -> dict[str, dict]:
    """Tensor name → its header entry (dtype, shape), over every safetensors file of the checkpoint. `bounds`: a
    checkpoint a request names, read within them (its files inside its directory, HeaderBounds.confined)."""
    path = Path(model_dir)
    files = safetensors_files(path, bounds)
    budget = bounds.max_header_bytes if bounds is not None else MAX_HEADER_BYTES * max(len(files), 1)
    most_tensors = bounds.max_tensors if bounds is not None else None
    tensors: dict[str, dict] = {}
    for f in files:
        header, start = _read_header(f, budget)
        budget -= start - 8
        if most_tensors is not None and len(tensors) + len(header) > most_tensors:
            raise ValueError(f"checkpoint {str(path)!r} is invalid: its headers name more tensors than this update "
                             f"may ({most_tensors}: twice the served checkpoint's).")
        for entry in header.values():  # where its bytes are in the file, for the few tensors whose values are read
            entry["_at"] = (f, start + entry["data_offsets"][0], start + entry["data_offsets"][1])
        tensors.update(header)
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
        if name.endswith(".weight") and packed_fp4_expert(name, dtype, tensors, getattr(cfg, "hf_config", None)):
            continue  # packed FP4 experts (DeepSeek-V4's), read packed (engine/config/fp4_experts.py)
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
    arch = REGISTRY.get(getattr(cfg, "architecture", ""))
    per = arch.spec.sublayers if arch is not None and arch.spec is not None else 1  # engine layers per checkpoint's
    if layers and (max(layers) + 1) * per < cfg.num_layers:
        raise ValueError(f"config.json num_hidden_layers={cfg.num_layers} disagrees with the checkpoint: it holds "
                         f"layers 0 to {max(layers)}" + (f" ({per} sublayers each)." if per > 1 else "."))
    experts = {int(m.group(1)) for m in map(_EXPERT.search, tensors) if m}
    if experts and max(experts) + 1 < cfg.num_experts:
        raise ValueError(f"config.json num_experts={cfg.num_experts} (n_routed_experts, num_local_experts) disagrees "
                         f"with the checkpoint: it holds experts 0 to {max(experts)}.")
    _check_linear_attention(cfg, tensors)
    if quant is not None and quant.method == "int4":
        _check_int4(cfg, tensors, quant)


def _shape(tensors: dict, name: str):
    entry = tensors.get(name)
    shape = entry.get("shape") if isinstance(entry, dict) else None
    return shape if isinstance(shape, list) else None


def _check_linear_attention(cfg, tensors: dict) -> None:
    """Qwen3-Next / Qwen3.5's gated DeltaNet layers: the tensors the linear_* fields alone shape (a value head dim
    that disagrees with the weights would otherwise index past them at load)."""
    for i in getattr(cfg, "linear_layers", ()):
        att = cfg.attention_for(i)
        for suffix, (want, fields) in att.header_shapes().items():
            name = f"model.layers.{i}.linear_attn.{suffix}"
            held = _shape(tensors, name)
            if held is not None and tuple(held) != want:
                raise ValueError(f"config.json disagrees with the checkpoint: tensor {name!r} has shape {held}, where "
                                 f"config.json ({fields}) makes it {list(want)}.")


def _check_int4(cfg, tensors: dict, quant) -> None:
    """INT4 checkpoints: every packed weight int32 (a float one would be cast into the words, garbage, without a
    word); compressed-tensors' `weight_shape` ([out, in] of the float weight) that of its packed tensor, and for a
    routed expert the shape config.json gives it."""
    packed = _INT4_PACKED[quant.layout]
    for name, entry in tensors.items():
        if name.endswith("." + packed) and entry.get("dtype") != "I32":
            raise ValueError(f"checkpoint tensor {name!r} has dtype {entry.get('dtype')!r} in its header: an INT4 "
                             f"packed weight ({quant.layout}) must be I32 (eight 4-bit values per int32 word).")
    if quant.layout != "compressed-tensors":
        return
    shapes = {n: e for n, e in tensors.items() if n.endswith(".weight_shape")}
    for name, entry in shapes.items():
        if entry.get("dtype") not in _SHAPE_DTYPES or entry.get("shape") != [2]:
            raise ValueError(f"checkpoint tensor {name!r} is {entry.get('dtype')} {entry.get('shape')} in its header: "
                             f"a compressed-tensors weight_shape is two integers (I64 or I32 [2]), the weight's "
                             f"[out, in].")
    for name, held in _read_pairs(shapes).items():
        base = name[: -len("weight_shape")]
        m = _EXPERT_LINEAR.search(name)
        if m:
            out_in = (cfg.moe_intermediate_size, cfg.hidden_size)
            want = list(out_in if m.group(1) in ("gate_proj", "up_proj", "w1", "w3") else out_in[::-1])
            if held != want:
                raise ValueError(f"checkpoint tensor {name!r} holds {held}: it must be the expert linear's shape "
                                 f"{want} (config.json moe_intermediate_size={cfg.moe_intermediate_size}, "
                                 f"hidden_size={cfg.hidden_size}).")
        words = _shape(tensors, base + "weight_packed")
        if words is not None and len(words) == 2 and not (held[0] == words[0]
                                                          and 8 * (words[1] - 1) < held[1] <= 8 * words[1]):
            raise ValueError(f"checkpoint tensor {name!r} holds {held}: it must be the shape its "
                             f"{base + 'weight_packed'!r} {words} unpacks to ([{words[0]}, {8 * words[1]}], the "
                             f"columns packed eight to an int32 word).")


def _read_pairs(entries: dict) -> dict[str, list[int]]:
    """The two integers each `weight_shape` tensor holds, read from its file: each file opened once, and pairs lying
    close together (safetensors orders a file's data by dtype, so a file's I64 pairs usually sit side by side) read
    in one run: a Kimi K2-sized checkpoint has some 70,000 of them."""
    by_file: dict = {}
    for name, entry in entries.items():
        f, begin, end = entry["_at"]
        by_file.setdefault(f, []).append((begin, end, name, _SHAPE_DTYPES[entry["dtype"]]))
    out: dict[str, list[int]] = {}
    for f, spans in by_file.items():
        spans.sort()
        with open(f, "rb") as fh:
            i = 0
            while i < len(spans):  # a run of spans at most 4 KiB apart (16 MiB in all) read at once
                j = i + 1
                while (j < len(spans) and spans[j][0] - spans[j - 1][1] <= 4096
                       and spans[j][1] - spans[i][0] <= 16 << 20):
                    j += 1
                fh.seek(spans[i][0])
                run = fh.read(spans[j - 1][1] - spans[i][0])
                for begin, end, name, fmt in spans[i:j]:
                    raw = run[begin - spans[i][0]: end - spans[i][0]]
                    out[name] = list(struct.unpack(fmt[0] + "2" + fmt[1], raw))
                i = j
    return out
