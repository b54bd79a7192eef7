"""KV-cache sizing: how many blocks of the paged KV cache a rank gets. Pure functions (of the model's
shape and numbers: no device, no allocation).

The cache is sized in one of three places, all through this module:
- the driver, before any weights load (`EngineArgs`): a given `num_kv_blocks` or `kv_cache_memory_bytes`,
  or on CPU a default that holds every sequence at full length;
- each rank, once its weights are in memory (`ModelRunner.available_kv_blocks`): what its device has left,
  measured there and turned into blocks here;
- the executor (`Executor.initialize_kv_cache`): every rank gets the same number of blocks, the smallest any
  rank can hold (the schedulers are identical, and one KV pool per rank).

Nothing here touches a device: measured byte counts come in as arguments, so the rules are testable alone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing only: a ModelConfig is read by attribute
    from .model import ModelConfig

CPU_KV_CAP_BYTES = 1 << 30  # 1 GiB: ample for tiny CPU models; the machine needs the rest


def kv_cache_bytes_per_token_per_layer(cfg: "ModelConfig") -> int:
    """What one token stores in one layer's cache, as its attention kind lays the cache out: a K and a V per kv
    head (GQA; block-sparse attention, MiniMax-M3's sparse layers, adds its indexer's key: index_head_dim values in
    the cache's dtype, bf16 under an fp8 cache), or one latent + rope key (MLA: (kv_lora_rank + qk_rope_head_dim) values, and DeepSeek Sparse
    Attention's indexer key: index_head_dim float values, or its fp8 row of index_head_dim e4m3 bytes padded to 4
    plus a float32 scale per 128 values, 132 bytes for DeepSeek-V3.2: --index-cache-dtype), in the cache's dtype
    (one byte per value with --kv-cache-dtype fp8). The model-wide attention's: where layers differ
    (ModelConfig.layer_attention) each layer's is `cfg.attention_for(i)`'s and the sums below add them."""
    return cfg.attention.kv_bytes_per_token(cfg.cache_dtype)


def kv_cache_bytes_per_token(cfg: "ModelConfig") -> int:
    """What one token stores in the caches of all the layers together (what a KV transfer of it moves)."""
    return sum(cfg.attention_for(i).kv_bytes_per_token(cfg.cache_dtype) for i in range(cfg.num_layers))


def kv_cache_layers(cfg: "ModelConfig") -> int:
    """Layers' worth of cache tensors one block id indexes: every layer, or, when sliding and full layers are
    paired on shared tensors (ModelConfig.kv_layer_pairs), one per pair."""
    pairs = cfg.kv_layer_pairs()
    return cfg.num_layers if pairs is None else len(pairs)


def kv_sliding_window(cfg: "ModelConfig") -> int | None:
    """The window of the sliding group when it has its own block table (CacheConfig.sliding_window), else None."""
    return None if cfg.kv_layer_pairs() is None else cfg.attention.sliding_window


def kv_cache_bytes_per_block(cfg: "ModelConfig", block_size: int, draft_bytes_per_token: int = 0) -> int:
    """The cache of every layer for one block of `block_size` tokens, in bytes (each tensor set once: a pair's
    shared set counts one layer). `draft_bytes_per_token`: what a speculative drafter's cache layer stores per
    token beside the model's, on the same block ids (the MTP layer's, a main layer's size; an EAGLE-3 head's, its
    own GQA shape: SpeculativeConfig.draft_kv_bytes_per_token): a block holds its tokens too."""
    pairs = cfg.kv_layer_pairs()
    owners = range(cfg.num_layers) if pairs is None else [full for full, _ in pairs]
    per_token = sum(cfg.attention_for(i).kv_bytes_per_token(cfg.cache_dtype) for i in owners)
    return (per_token + draft_bytes_per_token) * block_size


def state_bytes_per_sequence(cfg: "ModelConfig") -> int:
    """What one sequence's per-sequence state takes in all the linear-attention layers together (their conv and
    recurrent states: engine/models/gated_deltanet_config.py); 0 for a model without such layers."""
    return sum(cfg.attention_for(i).state_bytes_per_sequence(cfg.dtype) for i in cfg.state_layers)


def state_pool_bytes(cfg: "ModelConfig", num_state_slots: int, num_state_checkpoints: int) -> int:
    """The state pools' bytes: every slot, checkpoint and the null slot (engine/state/cache.py). They come out of
    the same budget as the KV blocks."""
    if not cfg.state_layers:
        return 0
    return (num_state_slots + num_state_checkpoints + 1) * state_bytes_per_sequence(cfg)


def blocks_per_sequence(max_model_len: int, block_size: int) -> int:
    """Blocks one sequence of `max_model_len` tokens needs (the last one partly filled)."""
    return -(-max_model_len // block_size)


def driver_num_kv_blocks(cfg: "ModelConfig", block_size: int, num_kv_blocks: int | None,
                         kv_cache_memory_bytes: int | None, device_type: str, max_num_seqs: int,
                         draft_bytes_per_token: int = 0, state_bytes: int = 0) -> int | None:
    """The driver's choice before any weights load; None: each rank sizes its own cache once loaded (CUDA).

    A given `num_kv_blocks` wins; else a given byte budget; else on CPU enough for every sequence at full
    length, capped at CPU_KV_CAP_BYTES. Raises ValueError when the budget holds not even one block.
    `draft_bytes_per_token`: as kv_cache_bytes_per_block. `state_bytes`: the per-sequence state pools
    (state_pool_bytes), taken from a given byte budget before the blocks."""
    if num_kv_blocks is not None:
        return num_kv_blocks
    per_block = kv_cache_bytes_per_block(cfg, block_size, draft_bytes_per_token)
    if kv_cache_memory_bytes is not None:
        budget = kv_cache_memory_bytes - state_bytes
    elif device_type == "cuda":
        # Sized by the workers once their weights are loaded (each measures its own
        # GPU; the engine takes the smallest), not guessed here on the driver's GPU.
        return None
    else:
        want = max_num_seqs * blocks_per_sequence(cfg.max_model_len, block_size) * per_block
        budget = min(want, CPU_KV_CAP_BYTES)
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(
            f"kv_cache_memory_bytes={budget} leaves no room for one KV block of {per_block} bytes: "
            "give more memory (kv_cache_memory_bytes or gpu_memory_utilization) or num_kv_blocks."
        )
    return int(blocks)


def gpu_kv_budget_bytes(total_bytes: int, free_bytes: int, memory_utilization: float) -> int:
    """What the KV cache may take on a GPU of `total_bytes` with `free_bytes` free now (weights loaded),
    keeping the whole device at most `memory_utilization` full. Negative when it is fuller already."""
    return int(total_bytes * memory_utilization) - (total_bytes - free_bytes)


def cpu_kv_budget_bytes(available_bytes: int, memory_utilization: float) -> int:
    """What the KV cache may take of the host memory the OS reports available, capped like the driver's
    CPU default (other processes share the machine's memory)."""
    return min(int(available_bytes * memory_utilization), CPU_KV_CAP_BYTES)


def blocks_in_budget(budget_bytes: int, bytes_per_block: int) -> int:
    """Whole blocks in `budget_bytes`, one kept back for the attention null block; never negative."""
    return max(budget_bytes // bytes_per_block - 1, 0)


def common_num_kv_blocks(blocks_per_rank: list[int]) -> int:
    """The blocks every rank gets: the smallest any rank can hold. Raises ValueError when that is none."""
    blocks = min(blocks_per_rank)
    if blocks < 1:
        raise ValueError("gpu_memory_utilization leaves no memory for the KV cache once the weights are "
                         "loaded: raise it, or pass kv_cache_memory_bytes / num_kv_blocks.")
    return blocks
