"""What a step hands the decoder's forward beside its tokens, positions and KV: a typed seam, so the features that
fill it (engine/multimodal/'s images, a step plug-in: engine/contract/step_plugin.py) and the models that read it
(engine/models/layers.ForwardContext) name one type and neither the other."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageSplice:
    """A step's image tokens, as the decoder reads them (engine/multimodal/ builds it on the rank: its step plug-in): the vision
    tower's embeddings written over the placeholder tokens' embeddings, and every token's 3-D rotary positions.
    Legend: M image tokens of this step, T its tokens."""

    rows_M: torch.Tensor  # int64: the flat-batch rows of the image tokens
    embeds_MD: torch.Tensor  # their embeddings (the vision tower's merger output), in rows_M's order
    # int64 [3, T]: temporal, height, width position of each token (text: three equal); None for a model whose
    # tokens turn by their sequence positions (Kimi K2.5)
    mrope_3T: torch.Tensor | None

    def select(self, t0: int, t1: int) -> "ImageSplice":
        """Tokens [t0, t1) only (a micro-batch of whole sequences)."""
        keep_M = (self.rows_M >= t0) & (self.rows_M < t1)
        mrope_3T = None if self.mrope_3T is None else self.mrope_3T[:, t0:t1]
        return ImageSplice(self.rows_M[keep_M] - t0, self.embeds_MD[keep_M], mrope_3T)

    def splice(self, x_TD: torch.Tensor) -> torch.Tensor:
        """x_TD with the image rows replaced (transformers' masked_scatter of the image features, by index)."""
        if self.rows_M.numel() == 0:
            return x_TD
        return x_TD.index_copy(0, self.rows_M, self.embeds_MD.to(x_TD.dtype))


__all__ = ["ImageSplice"]
