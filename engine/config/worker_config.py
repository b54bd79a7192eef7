"""WorkerConfig: exactly what one rank's Worker needs, built once from the EngineConfig
(`EngineConfig.worker_config()`) and shipped to every rank (pickled to each Ray actor)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .lora import LoRAConfig
from .model import ModelConfig
from .multimodal import MultimodalConfig
from .speculative import SpeculativeConfig

if TYPE_CHECKING:  # typing only (tests/test_layering.py TYPING_SEAMS)
    from ..contract.kv_connector import KVConnectorFactory

# Where the weights come from (vLLM's names): "auto" / "safetensors" read the checkpoint's safetensors files,
# "dummy" makes random weights on the device from config.json alone (engine/rank/dummy_weights.py).
LOAD_FORMATS = ("auto", "safetensors", "dummy")
# What start-up logs and banners say under load_format "dummy".
DUMMY_WARNING = ("--load-format dummy: the weights are RANDOM (no checkpoint was read); outputs are meaningless: "
                 "use it to measure speed and memory only.")


@dataclass(frozen=True)
class WorkerConfig:
    """One rank's model, device, KV cache shape, kernels and CUDA graphs, and the size of its process group.

    What the expert-parallel layer needs (placement, all-to-all backend, per-rank capacity) is not here: the
    worker receives the engine's `ExpertParallelPlan` (engine/contract/expert_parallel.py) beside this config.
    `comm_timeout_s` is how long a collective waits for its peers before the rank gives up.
    """

    model: ModelConfig
    device: torch.device  # the device type every rank uses; a rank's own index is set by its worker
    block_size: int
    num_kv_blocks: int | None  # None: sized by the ranks once their weights are loaded
    kernels: str
    cuda_graph_sizes: tuple[int, ...]  # decode batch sizes captured as CUDA graphs (empty: eager)
    load_progress: bool
    gpu_memory_utilization: float  # with num_kv_blocks None, how full the device may get with the cache in
    world_size: int
    comm_timeout_s: float
    # Run each step as two micro-batches overlapping each other's all-to-all (engine/rank/step_plan.py); ranks at
    # world size 1 run one batch whatever this says.
    two_batch_overlap: bool = False
    # The overlapped loop: device work runs on a stream the host does not wait for (engine/rank/device_stream.py).
    async_scheduling: bool = False
    load_format: str = "auto"  # LOAD_FORMATS
    # A KV connector (engine/contract/kv_connector.py): the worker builds its rank's worker half from it. None: none.
    kv_connector: KVConnectorFactory | None = None
    # Speculative decoding (engine/config/speculative.py): the runner's drafter; None: off.
    speculative: SpeculativeConfig | None = None
    # Per-sequence state pools of a model with linear-attention layers (CacheConfig's numbers); 0: none.
    num_state_slots: int = 0
    num_state_checkpoints: int = 0
    # Ranks per TP group (consecutive world ranks; docs/tensor-parallelism.md); 1: no tensor parallelism.
    tensor_parallel_size: int = 1
    # Rollout routing replay: every step's routed experts recorded (moe/routing_capture.py), for the requests that
    # ask (SamplingParams.return_routed_experts).
    return_routed_experts: bool = False
    # LoRA adapters (engine/config/lora.py): every rank's slots and host LRU; None: off.
    lora: LoRAConfig | None = None
    # A multimodal checkpoint's images (engine/multimodal/): whether the rank loads the vision tower, its cache.
    multimodal: MultimodalConfig = MultimodalConfig()
    # A CPU rank's cores left to the serving processes beside it (EngineArgs.cpu_reserved_cores).
    cpu_reserved_cores: int = 0

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
        if not positive_int(self.world_size):
            bad("world_size", "must be a positive integer")
        if not positive_int(self.tensor_parallel_size) or self.world_size % self.tensor_parallel_size:
            bad("tensor_parallel_size", f"must be a positive integer dividing world_size={self.world_size}")
        if not (isinstance(self.comm_timeout_s, (int, float)) and self.comm_timeout_s > 0):
            bad("comm_timeout_s", "must be a positive number of seconds")
        if not isinstance(self.two_batch_overlap, bool):
            bad("two_batch_overlap", "must be True or False")
        if not isinstance(self.async_scheduling, bool):
            bad("async_scheduling", "must be True or False")
        if not isinstance(self.return_routed_experts, bool):
            bad("return_routed_experts", "must be True or False")
        if self.load_format not in LOAD_FORMATS:
            bad("load_format", f"choose from {', '.join(map(repr, LOAD_FORMATS))}")
        if self.kv_connector is not None and not callable(getattr(self.kv_connector, "worker_side", None)):
            bad("kv_connector", "must be None or a KV connector (a worker_side(rank) method)")
