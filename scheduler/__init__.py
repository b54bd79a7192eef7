"""Requests, the paged KV block pool with prefix caching, and the token-budget
scheduler. Pure Python: nothing here imports torch or numpy (DESIGN.md)."""
from .block_pool import BlockPool, extend_block_hashes, hash_block_tokens
from .config import CacheConfig, SchedulerConfig
from .engine_output import EngineCoreOutput, SchedulerStats
from .kv_cache_manager import KVCacheManager
from .outputs import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    TokenLogprobs,
)
from .request import Request, RequestStatus, get_finish_reason, is_finished
from .scheduler import Scheduler

__all__ = [
    "BlockPool", "CacheConfig", "CachedRequestData", "EngineCoreOutput", "KVCacheManager",
    "ModelRunnerOutput", "NewRequestData", "Request", "RequestStatus", "Scheduler",
    "SchedulerConfig", "SchedulerOutput", "SchedulerStats", "TokenLogprobs",
    "extend_block_hashes", "get_finish_reason", "hash_block_tokens", "is_finished",
]
