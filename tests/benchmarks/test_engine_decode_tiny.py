"""benchmarks/engine_decode.py --tiny-max-pairs: a copy of kernels/configs/ whose float tables carry the tiny path's
TINY entry (DEFAULT_TINY_FLOAT's blocks, the given max_pairs) becomes the process's config directory; the other
formats' files are copied unchanged, and a bucket's own TINY entry is kept."""
from __future__ import annotations

import json

import torch

from moelink.benchmarks.engine_decode import turn_on_tiny
from moelink.kernels import moe_config


def test_turn_on_tiny_adds_the_entry_to_every_float_table(monkeypatch):
    monkeypatch.setattr(moe_config, "CONFIG_DIR", moe_config.CONFIG_DIR)  # (restored after the test)
    committed = moe_config.CONFIG_DIR
    root = turn_on_tiny(8)
    assert moe_config.CONFIG_DIR == root and sorted(p.name for p in root.glob("*.json")) == sorted(
        p.name for p in committed.glob("*.json"))
    cpu = moe_config.get_moe_config(128, 768, 1, 8, torch.device("cpu"))
    assert cpu.tiny is not None and cpu.tiny.max_pairs == 8 and cpu.tiny.up == moe_config.DEFAULT_TINY_FLOAT.up
    assert cpu.uses_tiny(8) and not cpu.uses_tiny(9)
    h100 = moe_config.lookup_moe_config(128, 768, 1, 8, "NVIDIA_H100_80GB_HBM3")
    assert h100.tiny is not None and h100.tiny.max_pairs == 8
    for name in ("fp8_moe_default.json", "mxfp4_moe_default.json", "int4_moe_default.json"):
        assert json.loads((root / name).read_text()) == json.loads((committed / name).read_text())
