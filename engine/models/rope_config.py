"""Rotary position embedding as config (rope.py beside it builds the tables): its type, style, width and base, read
from config.json by the families' readers; pure data, no model code."""
from __future__ import annotations

from dataclasses import dataclass

# rope_parameters.rope_type values moelink implements: "default" (plain RoPE) and "yarn" (inverse frequencies
# and the attention factor from transformers' own ROPE_INIT_FUNCTIONS, so they are the library's numbers).
ROPE_TYPES = ("default", "yarn")
# Scaled types only the families that name them accept (Architecture.rope_types; their inverse frequencies from
# transformers' ROPE_INIT_FUNCTIONS as yarn's): "llama3", Llama 3.1's and Llama 4's band-wise frequency scaling;
# "longrope", Phi-3.5-MoE's per-frequency factors (transformers' PhiMoE computes them without a sequence length: its
# short_factor at every position; the family names the cos/sin scale: RopeConfig.attention_factor); "proportional",
# Gemma 4's full-attention layers (the first partial_rotary_factor * head_dim / 2 frequencies of a head_dim-wide
# rope, base^(-2i / head_dim), the others 0: pairs (i, i + head_dim / 2) of the whole head, most of them unturned).
FAMILY_ROPE_TYPES = ("llama3", "longrope", "proportional")
# How the rotated dimensions pair up: "neox" rotates (x[i], x[i + R/2]) (Hugging Face rotate_half);
# "interleaved" rotates (x[2i], x[2i + 1]) and returns the halves de-interleaved (DeepSeek-V3 rope_interleave:
# the checkpoint's rope rows are de-interleaved at load, after which it runs as neox); "complex" rotates
# (x[2i], x[2i + 1]) as complex numbers in float32 (DeepSeek-V2, as transformers computes it).
ROPE_STYLES = ("neox", "interleaved", "complex")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind: the first `rotary_dim` dims of each head (GQA; GLM rotates a
    `partial_rotary_factor` prefix) or the rope part of each head (MLA's qk_rope_head_dim)."""

    rotary_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    style: str = "neox"
    # Where transformers keeps this rope's parameters when a model has one rope per layer kind: the key of
    # config.json's rope_parameters ({"full_attention": {...}, "sliding_attention": {...}}, MiMo-V2-Flash), passed
    # as `layer_type` to transformers' rope init for the scaled types. None: rope_parameters is one rope.
    layer_type: str | None = None
    # Qwen's multimodal rotary (3-D: temporal, height, width positions), interleaved as Qwen3.5 lays it out
    # (transformers' Qwen3_5MoeTextRotaryEmbedding.recomposition_frequencies): frequency i turns by the height
    # position when i % 3 == 1 and i < 3 * mrope_section[1], by the width one when i % 3 == 2 and i < 3 *
    # mrope_section[2], by the temporal one otherwise. Text tokens have three equal positions, so a text-only step
    # runs as plain 1-D rope; () : no multimodal rotary (engine/models/rope.py RotaryEmbedding.mrope_table).
    mrope_section: tuple[int, ...] = ()
    # The scale of cos / sin where the family's model sets it rather than the rope type's init (PhiMoE's
    # rope_parameters.short_mscale in place of longrope's attention factor); None: the init's.
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        if self.mrope_section and (len(self.mrope_section) != 3 or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.mrope_section)):
            raise ValueError(f"mrope_section={list(self.mrope_section)!r} is invalid: must be three integers >= 0.")
        if self.rope_type not in ROPE_TYPES + FAMILY_ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported: allowed: "
                             f"{', '.join(ROPE_TYPES + FAMILY_ROPE_TYPES)}.")
        if self.style not in ROPE_STYLES:
            raise ValueError(f"rope style={self.style!r} is invalid: allowed: {', '.join(ROPE_STYLES)}.")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim={self.rotary_dim} is invalid: must be an even number >= 2.")


__all__ = ["FAMILY_ROPE_TYPES", "ROPE_STYLES", "ROPE_TYPES", "RopeConfig"]
