"""What a block builder is handed: the model's config and the rank's resources, and a per-model cache of the
parts several layers share (rotary tables, a family's quantization reading)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, TypeVar, cast

import torch

from moelink.moe.layer import ExpertParallel
from moelink.moe.stats import MoEStats

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ...tp.group import TensorParallel
from ..rope import RotaryEmbedding

if TYPE_CHECKING:  # a type only, as engine/models/layers.py names it
    from moelink.kernels.ops import Kernels

T = TypeVar("T")


@dataclass
class BuildContext:
    """One model's (or one MTP layer's) build. tp: None or a group of more than one rank (TP off otherwise)."""

    cfg: ModelConfig
    spec: ArchSpec
    kernels: Kernels
    device: torch.device
    ep: ExpertParallel | None
    stats: MoEStats
    tp: TensorParallel | None
    names: frozenset[str] = frozenset()  # the checkpoint's tensor names: the experts' on-disk layout per layer
    rope_override: RotaryEmbedding | None = None  # an MTP layer's own table (engine/spec/heads/mtp.py)
    # An MTP layer's row in its own MoEStats (its index is past the main layers'); None: its index in sparse_layers.
    moe_index: int | None = None
    # The shared parts by key, each whatever its maker made (`shared` hands it back as that type).
    cache: dict[str, object] = field(default_factory=dict)

    def shared(self, key: str, make: Callable[[], T]) -> T:
        """The model's one `key` part, made on first use: layers that share it hold the same object."""
        if key not in self.cache:
            self.cache[key] = make()
        return cast(T, self.cache[key])  # made by `make` under this key: one key, one maker

    def rope(self, layer_idx: int) -> RotaryEmbedding | None:
        """One table per distinct rope: one for most models, one per layer kind where the kinds rotate differently
        (MiMo-V2-Flash's full and sliding layers); None for a layer without rope (linear attention)."""
        if self.rope_override is not None:
            return self.rope_override
        r = getattr(self.cfg.attention_for(layer_idx), "rope", None)
        if r is None:
            return None
        ropes: dict = self.shared("ropes", dict)
        if r not in ropes:
            ropes[r] = RotaryEmbedding(r, self.cfg.hf_config, self.cfg.max_model_len, self.kernels, self.device)
        return ropes[r]

    def moe_row(self, layer_idx: int) -> int:
        """The MoEStats row of sparse layer `layer_idx`."""
        return self.cfg.sparse_layers.index(layer_idx) if self.moe_index is None else self.moe_index


__all__ = ["BuildContext"]
