"""What a multimodal checkpoint may be sent (engine/multimodal/; docs/multimodal.md): vLLM's `limit_mm_per_prompt`
(--limit-mm-per-prompt), the largest image, and the rank's encoder cache. No torch."""
from __future__ import annotations

from dataclasses import dataclass, field

# The modalities a prompt's multi_modal_data may name. Video is off unless a limit turns it on: a video is many
# frames of tokens (and it comes as the processor's outputs only: docs/multimodal.md).
MODALITIES = ("image", "video")
DEFAULT_IMAGES_PER_PROMPT = 16
DEFAULT_VIDEOS_PER_PROMPT = 0
# An image's pixels (width x height) before the processor resizes it: a 64 MP photo is far past what any prompt
# needs and what a decoder should hold in memory while it is resized.
DEFAULT_MAX_PIXELS = 1 << 25
DEFAULT_ENCODER_CACHE_BYTES = 256 << 20


def _limits(value) -> dict[str, int]:
    if value is None:
        return {"image": DEFAULT_IMAGES_PER_PROMPT, "video": DEFAULT_VIDEOS_PER_PROMPT}
    if not isinstance(value, dict):
        raise ValueError(f"limit_mm_per_prompt={value!r} is invalid: must be a dict of modality -> count, "
                         f"e.g. {{'image': 4}}.")
    out = {"image": DEFAULT_IMAGES_PER_PROMPT, "video": DEFAULT_VIDEOS_PER_PROMPT}
    for k, v in value.items():
        if k not in MODALITIES:
            raise ValueError(f"limit_mm_per_prompt key {k!r} is invalid: allowed: {', '.join(MODALITIES)}.")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"limit_mm_per_prompt[{k!r}]={v!r} is invalid: must be an integer >= 0.")
        out[k] = v
    return out


@dataclass(frozen=True)
class MultimodalConfig:
    """`limit_mm_per_prompt`: per modality, how many items one prompt may carry (vLLM's name; 0 turns the modality
    off, and with images and video off a multimodal checkpoint is served as its text model, its vision tower not
    loaded). `max_pixels`: the most pixels (width x height) one image, or one frame of a video, may have.
    `encoder_cache_bytes`: the rank's cache of vision-tower outputs by image hash (least recently used out first)."""

    limit_mm_per_prompt: dict = field(default_factory=lambda: _limits(None))
    max_pixels: int = DEFAULT_MAX_PIXELS
    encoder_cache_bytes: int = DEFAULT_ENCODER_CACHE_BYTES

    def __post_init__(self) -> None:
        object.__setattr__(self, "limit_mm_per_prompt", _limits(self.limit_mm_per_prompt))
        for name in ("max_pixels", "encoder_cache_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "max_pixels" else 0):
                raise ValueError(f"{name}={v!r} is invalid: must be an integer >= "
                                 f"{1 if name == 'max_pixels' else 0}.")

    @property
    def images(self) -> int:
        return self.limit_mm_per_prompt["image"]

    @property
    def videos(self) -> int:
        return self.limit_mm_per_prompt["video"]

    @property
    def media_on(self) -> bool:
        """Whether the vision tower is needed: images or video on."""
        return bool(self.images or self.videos)


def parse_limit_mm_per_prompt(text: str) -> dict[str, int]:
    """--limit-mm-per-prompt as vLLM takes it: JSON ('{"image": 4, "video": 1}') or the older 'image=4,video=1'."""
    import json

    text = text.strip()
    try:
        value = json.loads(text) if text.startswith("{") else {
            k.strip(): int(v) for k, v in (kv.split("=", 1) for kv in text.split(",") if kv.strip())}
    except ValueError:
        raise ValueError(f"--limit-mm-per-prompt={text!r} is invalid: give JSON such as '{{\"image\": 4}}'.") from None
    return _limits(value)


__all__ = ["MODALITIES", "MultimodalConfig", "parse_limit_mm_per_prompt"]
