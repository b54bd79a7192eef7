"""moelink.scheduler: requests and their states, the paged KV block pool with prefix caching, the
token-budget scheduler (chunked prefill, preemption) and the data-parallel request router.

Pure Python: the standard library only, no torch or numpy (ARCHITECTURE.md: Design rules 13), so it is tested
on plain lists.
`SchedulerOutput` / `ModelRunnerOutput` (outputs.py) are the only things that cross to the worker and back
(a KV connector's transfers too: kv_connector.py is that seam's scheduler side).
Must not import: benchmarks, engine (every sub-package), planner, moe, comm, kernels.
"""
from .block_pool import BlockPool, extend_block_hashes, hash_block_tokens
from .config import CacheConfig, SchedulerConfig
from .engine_output import EngineCoreOutput, SchedulerStats
from .kv_cache_manager import KVCacheManager
from .kv_connector import KVConnector
from .outputs import (
    CachedRequestData,
    KVTransfer,
    KVTransferPlan,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    TokenLogprobs,
)
from .request import Request, RequestStatus, get_finish_reason, is_finished
from .scheduler import Scheduler

__all__ = [
    "BlockPool", "CacheConfig", "CachedRequestData", "EngineCoreOutput", "KVCacheManager", "KVConnector",
    "KVTransfer", "KVTransferPlan", "ModelRunnerOutput", "NewRequestData", "Request", "RequestStatus", "Scheduler",
    "SchedulerConfig", "SchedulerOutput", "SchedulerStats", "TokenLogprobs",
    "extend_block_hashes", "get_finish_reason", "hash_block_tokens", "is_finished",
]
