"""The attention configs ModelConfig.attention holds (`AttentionConfig`). Each layer kind's config sits beside its
module in engine/models/ (`<module>_config.py`: gqa_config.py, mla_config.py, rope_config.py, dsa_config.py,
gated_deltanet_config.py, blocks/ffn_config.py, ...; ARCHITECTURE.md: How to add a model family), counted in
engine/config's floor (tests/test_layering.py)."""
from __future__ import annotations

from ..models.gqa_config import GQAConfig
from ..models.mla_config import MLAConfig

# A model's attention kind (the gated-DeltaNet, block-sparse and compressed kinds sit beside them per layer:
# ModelConfig.layer_attention).
AttentionConfig = GQAConfig | MLAConfig

__all__ = ["AttentionConfig"]
