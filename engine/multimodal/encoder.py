"""Rank side: the checkpoint's vision tower, and a cache of its outputs by image hash.

The tower is transformers' own module, not a copy: the class transformers builds as the wrapper's `visual`
submodule (AutoModel.from_config(config.vision_config), as Qwen3_5MoeModel.__init__ does), loaded with the
checkpoint's model.visual.* tensors. It is the reference and the CPU path; a GPU path (fused patch embedding,
varlen flash attention) is later work (docs/multimodal.md).

Legend: P patches of one image, C one patch's values, N its tokens after the spatial merge, D the text model's
hidden size (the merger's out_hidden_size).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import torch

from .spec import VISION_TOWERS


def _tower_tensors(model_dir: str, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under `prefix` (the vision tower's), named as the tower names them."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if name.startswith(prefix):
                    out[name[len(prefix):]] = sf.get_tensor(name)
    return out


class VisionTower:
    """transformers' vision module of a multimodal checkpoint (module docstring), in the engine's dtype."""

    def __init__(self, model_dir: str, architecture: str, dtype: torch.dtype, device: torch.device):
        from transformers import AutoConfig, AutoModel

        hf = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        self.module = AutoModel.from_config(hf.vision_config).to(dtype=dtype).eval()
        tensors = _tower_tensors(model_dir, VISION_TOWERS[architecture])
        bad = sorted(n for n, t in tensors.items() if not t.is_floating_point())
        if bad:
            raise ValueError(f"model={model_dir!r}: the vision tower's tensor {VISION_TOWERS[architecture]}{bad[0]} "
                             f"is {tensors[bad[0]].dtype}: a quantized vision tower is not supported.")
        missing, unexpected = self.module.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"model={model_dir!r}: the vision tower's tensors do not match its config (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}).")
        self.module.to(device)
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def encode(self, pixels_PC: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        """One image's token embeddings [N, D] (the merger's output)."""
        grid_13 = torch.tensor([grid_thw], dtype=torch.long, device=self.device)
        out = self.module(pixels_PC.to(self.device, self.dtype), grid_thw=grid_13)
        return out.pooler_output


class EncoderCache:
    """The tower's outputs by image hash, least recently used out first once over `max_bytes` (0: no cache).
    Counts hits and misses and the encoder's time (the feature's metrics)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.encode_s = 0.0

    def get(self, key: bytes, encode) -> torch.Tensor:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        t0 = time.perf_counter()
        emb_ND = encode()
        self.encode_s += time.perf_counter() - t0
        size = emb_ND.numel() * emb_ND.element_size()
        if size <= self.max_bytes:
            self._entries[key] = emb_ND
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
        return emb_ND

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["EncoderCache", "VisionTower"]
