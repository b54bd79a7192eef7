"""WorkerConfig: exactly what one rank's Worker needs, built once from the EngineConfig
(`EngineConfig.worker_config()`) and shipped to every rank (pickled to each Ray actor)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig, ParallelConfig


@dataclass(frozen=True)
class WorkerConfig:
    """One rank's model, device, KV cache shape, kernels and CUDA graphs, and its expert-parallel set-up.

    `parallel` is the engine's ParallelConfig: a worker reads its world size, comm_timeout_s (how long a
    collective waits for its peers), num_redundant_experts and all_to_all. `max_num_batched_tokens` bounds
    the tokens one rank sends in a step (the fixed-size all-to-all buffers are sized by it).
    """

    model: ModelConfig
    device: torch.device  # the device type every rank uses; a rank's own index is set by its worker
    block_size: int
    num_kv_blocks: int | None  # None: sized by the ranks once their weights are loaded
    kernels: str
    cuda_graph_sizes: tuple[int, ...]  # decode batch sizes captured as CUDA graphs (empty: eager)
    load_progress: bool
    gpu_memory_utilization: float  # with num_kv_blocks None, how full the device may get with the cache in
    parallel: ParallelConfig
    max_num_batched_tokens: int

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str):
            raise ValueError(f"WorkerConfig.{field}={getattr(self, field)!r} is invalid: {allowed}.")

        def positive_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        if not isinstance(self.device, torch.device):
            bad("device", "must be a torch.device")
        if not positive_int(self.block_size):
            bad("block_size", "must be a positive integer")
        if self.num_kv_blocks is not None and not positive_int(self.num_kv_blocks):
            bad("num_kv_blocks", "must be None (sized by the ranks) or a positive integer")
        if not isinstance(self.cuda_graph_sizes, tuple) or not all(positive_int(s) for s in self.cuda_graph_sizes):
            bad("cuda_graph_sizes", "must be a tuple of positive batch sizes")
        if not 0 < self.gpu_memory_utilization <= 1:
            bad("gpu_memory_utilization", "must be in (0, 1]")
        if not positive_int(self.max_num_batched_tokens):
            bad("max_num_batched_tokens", "must be a positive integer")

    @property
    def world_size(self) -> int:
        return self.parallel.world_size
