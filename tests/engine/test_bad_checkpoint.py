"""Issue 32 item 10: a bad config.json or safetensors header is one clear error before anything is allocated.

Each case is a copy of the built-in model with one thing broken. Before: vocab -5 and layers -1 gave tracebacks
from inside the model, hidden 1e9 and max_position 1e12 tried to allocate terabytes, experts 1e7 loaded, a FIFO
named model.safetensors hung the loader, and a weight whose header says I32, or that holds NaN, loaded silently.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from moelink.engine.config.engine_args import EngineArgs

BUILTIN = Path(__file__).resolve().parents[2] / "builtin-model"


@pytest.fixture
def copy(tmp_path):
    def make() -> Path:
        d = tmp_path / "m"
        shutil.copytree(BUILTIN, d)
        return d
    return make


def _config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _engine_config(d: Path):
    return EngineArgs(model=str(d), dtype="float32", num_kv_blocks=16, device="cpu").create_engine_config()


@pytest.mark.parametrize("field, value, message", [
    ("vocab_size", -5, r"config\.json vocab_size=-5 is invalid: must be an integer in \[1, 4194304\]"),
    ("num_hidden_layers", -1, r"config\.json num_hidden_layers=-1 is invalid"),
    ("hidden_size", 10**9, r"config\.json hidden_size=1000000000 is invalid"),
    ("num_local_experts", 10**7, r"config\.json num_experts \(n_routed_experts, num_local_experts\)=10000000 is invalid"),
    ("max_position_embeddings", 10**12, r"config\.json max_position_embeddings=1000000000000 is invalid"),
    # In range, but not what the weights hold: refused from the headers, before the model is sized from it.
    ("hidden_size", 4096, r"config\.json hidden_size=4096 disagrees with the checkpoint: model\.embed_tokens\.weight "
                          r"has shape \[4096, 128\]"),
    ("num_local_experts", 64, r"config\.json num_experts=64 .* disagrees with the checkpoint: it holds experts 0 to 7"),
    ("num_hidden_layers", 12, r"config\.json num_hidden_layers=12 disagrees with the checkpoint: it holds layers 0 to 2"),
])
def test_bad_config_values_are_one_error_naming_the_field(copy, field, value, message):
    d = copy()
    _config(d, **{field: value})
    with pytest.raises(ValueError, match=message):
        _engine_config(d)


def test_a_fifo_named_model_safetensors_is_refused_not_waited_on(copy):
    d = copy()
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors' is not a regular file"):
        _engine_config(d)


def test_an_integer_weight_dtype_in_the_header_is_refused(copy):
    d = copy()
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = "model.embed_tokens.weight"
    assert header[name]["dtype"] == "F32"
    header[name]["dtype"] = "I32"  # same width: the data still parses, as it did on the old loader
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    f.write_bytes(bytes(raw[:8]) + text + bytes(raw[8 + n:]))
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model\.embed_tokens\.weight' has dtype 'I32' in its "
                                         r"header: a weight must be one of F64, F32"):
        _engine_config(d)


def test_nan_weights_are_refused_at_load(copy):
    from safetensors.torch import load_file, save_file

    from moelink.engine import LLM

    d = copy()
    tensors = load_file(str(d / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"checkpoint tensor '{name}' holds \d+ NaN value\(s\) of \d+: the "
                                         r"checkpoint is corrupt"):
        LLM(str(d), dtype="float32", max_model_len=64, num_kv_blocks=16)


def test_a_truncated_safetensors_file_is_one_error_naming_it(copy):
    """Issue 53: a file cut short after its header (a partial download): its header's tensors run past the file's
    end. Before, the config was accepted and the loader raised safetensors' own SafetensorError ("incomplete
    metadata, file not fully covered"); now the header check refuses it naming the file, and the loader, should it
    meet such a file anyway, says the same in a ValueError."""
    from moelink.engine.rank.loader import SafetensorsCheckpoint

    d = copy()
    f = d / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    f.write_bytes(raw[:8 + n + 100])
    message = r"checkpoint file '.*model\.safetensors' is truncated or corrupt"
    with pytest.raises(ValueError, match=message + r": its header's tensors take \d+ bytes of data, the file holds "
                                                   r"100 after the header"):
        _engine_config(d)
    with pytest.raises(ValueError, match=message + r": safetensors cannot read its header"):
        SafetensorsCheckpoint(d)
