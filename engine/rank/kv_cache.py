"""A rank's paged KV cache tensors, as each attention kind lays them out (its config beside its module: engine/models/gqa_config.py, ...).

Legend: B blocks (the null block, one more, last), L block size.
"""
from __future__ import annotations

import torch

from ..config.model import ModelConfig


def make_kv_caches(cfg: ModelConfig, kv_pairs, num_kv_blocks: int, block_size: int,
                   device: torch.device) -> tuple[list[tuple[torch.Tensor, ...]], int]:
    """Per main layer its cache tensors, zeroed, in the layer's own shapes (`cfg.attention_for(layer)`):
    (k_cache, v_cache) for GQA, (latent_cache,) for MLA (and DSA's index_cache beside it), each [num_kv_blocks + 1, L,
    ...] (the null block last), in the dtypes the kind gives (`cache_dtypes`: DSA's fp8 keys are uint8 rows);
    and their bytes. `kv_pairs`: (full, sliding) layer pairs that share one tensor set (a block id belongs to one
    group at a time, so their KV never meets; ModelConfig.kv_layer_pairs pairs only layers of one shape), or None."""

    def tensors(layer: int) -> tuple[torch.Tensor, ...]:
        att = cfg.attention_for(layer)
        shapes = att.cache_shapes(num_kv_blocks, block_size, cfg.cache_dtype)
        dtypes = att.cache_dtypes(cfg.cache_dtype)
        return tuple(torch.zeros(shape, dtype=dt, device=device) for shape, dt in zip(shapes, dtypes))

    caches: list
    if kv_pairs is None:
        caches = [tensors(i) for i in range(cfg.num_layers)]
        owners = caches
    else:
        caches = [None] * cfg.num_layers
        for full, sliding in kv_pairs:
            caches[full] = caches[sliding] = tensors(full)
        owners = [caches[full] for full, _ in kv_pairs]
    return caches, sum(t.numel() * t.element_size() for layer in owners for t in layer)


__all__ = ["make_kv_caches"]
