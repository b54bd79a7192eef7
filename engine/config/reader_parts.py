"""The pieces the families' config readers share (engine/models/<family>/reader.py): the rotary width, a
RopeConfig and a GQAConfig from the common fields engine/config/hf_readers.read_fields reads first."""
from __future__ import annotations

from .layer_configs import GQAConfig, RopeConfig, unsupported

# The widest MLP config.json may name: intermediate_size's bound (engine/config/model.py _DIMS), 2^18, far above any
# published model's (18,432 for DeepSeek-V3's dense layers) and far below a typo's allocation.
MAX_WIDTH = 1 << 18

LAYER_TYPES = ("sliding_attention", "full_attention")


def rotary_dim(head_dim: int, factor, field_name: str = "partial_rotary_factor") -> int:
    """The rotated prefix of a head, as transformers computes it: int(head_dim * factor), even and >= 2."""
    rotary_dim = int(head_dim * float(factor))
    if not 0 < float(factor) <= 1 or rotary_dim < 2 or rotary_dim % 2:
        raise unsupported(field_name, factor, f"a factor in (0, 1] giving an even rotary width of head_dim={head_dim} "
                                              f">= 2")
    return rotary_dim



def rope_config(rope: dict, c: dict, rotary_dim: int, style: str = "neox") -> RopeConfig:
    return RopeConfig(rotary_dim, c["rope_theta"], rope["rope_type"], style)



def gqa(c: dict, rope: RopeConfig, **kw) -> GQAConfig:
    return GQAConfig(c["num_heads"], c["num_kv_heads"], c["head_dim"], rope, **kw)



__all__ = ["LAYER_TYPES", "MAX_WIDTH", "gqa", "rope_config", "rotary_dim"]
