"""Rank side: the checkpoint's vision tower, and a cache of its outputs by image (or video) hash.

The tower is transformers' own modules, not a copy: the submodules transformers' multimodal model builds for its
images (spec.VisionSpec: Qwen3.5's `visual`; Kimi K2.5's `vision_tower` and `mm_projector`), built as its __init__
builds them and loaded with the checkpoint's tensors under their prefixes; an image is encoded by the model class's
own get_image_features, called on them alone (the text model is not built). It is the reference and the CPU path; a
GPU path (fused patch embedding, varlen flash attention) is later work (docs/multimodal.md).

Legend: P patches of one image, N its tokens after the spatial merge, D the text model's hidden size.
"""
from __future__ import annotations

import sys
import time
import types
from collections import OrderedDict
from pathlib import Path

import torch

from .spec import VISION_SPECS, VisionModule


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


def _build(module: VisionModule, hf, model_cls) -> torch.nn.Module:
    """One submodule as transformers' model __init__ builds it (AutoModel from its sub-config, a pretrained class by
    _from_config, a plain module from the config)."""
    from transformers import AutoModel, PreTrainedModel

    sub = getattr(hf, module.config_field) if module.config_field else hf
    if module.cls == "AutoModel":
        return AutoModel.from_config(sub)
    cls = getattr(sys.modules[model_cls.__module__], module.cls)
    return cls._from_config(sub) if issubclass(cls, PreTrainedModel) else cls(sub)


class VisionTower:
    """transformers' image modules of a multimodal checkpoint (module docstring), in the engine's dtype."""

    def __init__(self, model_dir: str, architecture: str, dtype: torch.dtype, device: torch.device):
        import transformers
        from transformers import AutoConfig

        spec = VISION_SPECS[architecture]
        hf = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        self._model_cls = getattr(transformers, spec.model_class)
        # A stand-in for the model: its image submodules and config, what get_image_features reads.
        self.module = torch.nn.Module()
        self.module.config = hf
        for m in spec.modules:
            part = _build(m, hf, self._model_cls).to(dtype=dtype).eval()
            tensors = _tower_tensors(model_dir, m.prefix)
            bad = sorted(n for n, t in tensors.items() if not t.is_floating_point())
            if bad:
                raise ValueError(f"model={model_dir!r}: the vision tower's tensor {m.prefix}{bad[0]} is "
                                 f"{tensors[bad[0]].dtype}: a quantized vision tower is not supported.")
            missing, unexpected = part.load_state_dict(tensors, strict=False)
            if missing or unexpected:
                raise ValueError(f"model={model_dir!r}: the tensors under {m.prefix} do not match its config "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")
            setattr(self.module, m.attribute, part)
        if spec.video:  # the model's get_video_features calls self.get_image_features
            setattr(self.module, "get_image_features", types.MethodType(self._model_cls.get_image_features,
                                                                        self.module))
        self.module.to(device)
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def encode(self, pixels_P: torch.Tensor, grid_thw: tuple[int, int, int], video: bool = False) -> torch.Tensor:
        """One image's (or one video's, all its frames) token embeddings [N, D]: the model's own get_image_features
        (get_video_features) on its image modules."""
        grid_13 = torch.tensor([grid_thw], dtype=torch.long, device=self.device)
        features = self._model_cls.get_video_features if video else self._model_cls.get_image_features
        out = features(self.module, pixels_P.to(self.device, self.dtype), grid_13, return_dict=True)
        return out.pooler_output[0]


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
