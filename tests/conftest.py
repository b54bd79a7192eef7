"""Shared fixtures: tiny random Hugging Face checkpoints built once per session."""
from __future__ import annotations

import os

import pytest
import torch

# Two cores on CI: torch's intra-op threads plus pytest is plenty.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Tiny configs used across the suite. Each arch has one with a number of
# experts that is not a power of two and top-k >= 3.
TINY_CONFIGS = {
    "qwen3_e6k3": dict(arch="qwen3_moe", num_layers=2, hidden_size=64, num_experts=6, top_k=3, num_heads=4,
                       num_kv_heads=2, head_dim=16, moe_intermediate_size=32, vocab_size=512),
    "qwen3_e8k2_dense1": dict(arch="qwen3_moe", num_layers=3, hidden_size=48, num_experts=8, top_k=2, num_heads=6,
                              num_kv_heads=3, head_dim=8, moe_intermediate_size=24, vocab_size=400,
                              mlp_only_layers=(1,), norm_topk_prob=False),
    "mixtral_e5k3": dict(arch="mixtral", num_layers=2, hidden_size=64, num_experts=5, top_k=3, num_heads=4,
                         num_kv_heads=1, moe_intermediate_size=40, vocab_size=512),
    "mixtral_e8k2": dict(arch="mixtral", num_layers=2, hidden_size=32, num_experts=8, top_k=2, num_heads=2,
                         num_kv_heads=2, moe_intermediate_size=48, vocab_size=320),
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(name) → path of that tiny checkpoint (built on first use)."""
    from moelink.engine.tiny_model import make_tiny_model

    built: dict[str, str] = {}

    def get(name: str, **overrides) -> str:
        key = name + repr(sorted(overrides.items()))
        if key not in built:
            cfg = dict(TINY_CONFIGS[name], **overrides)
            out = tmp_path_factory.mktemp(name)
            built[key] = str(make_tiny_model(out, **cfg))
        return built[key]

    return get
