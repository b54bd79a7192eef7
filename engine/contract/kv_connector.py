"""What the engine is given to move KV between engines (prefill/decode disaggregation): a `KVConnectorFactory`.

The driver asks it for each rank's scheduler half (`scheduler_side(rank)`: a scheduler/kv_connector.py
`KVConnector`, pure Python) and each rank's worker builds its worker half from it (`worker_side(rank)`: an
engine/contract/kv_blocks.py `WorkerKVConnector`, which copies blocks through the runner's `PagedKVBlocks`). The
factory travels to the ranks in the `WorkerConfig` (pickled to a Ray actor), so a connector whose halves share
memory must refuse to be pickled, as the in-host reference (engine/kv_transfer/inhost.py) does; a network
transport ships addresses instead, and the offload tiers (engine/kv_transfer/offload.py) their config: their
scheduler half decides, each rank's worker half allocates and copies on its own. `EngineArgs(kv_connector=...)` / `LLM(..., kv_connector=...)` set it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from moelink.scheduler.kv_connector import KVConnector

from .kv_blocks import WorkerKVConnector

if TYPE_CHECKING:  # typing only: the contract sits above the configuration, which names these protocols
    from ..config.engine_args import EngineConfig


class KVConnectorFactory(Protocol):
    """A KV connector's two halves, per rank (module docstring)."""

    def scheduler_side(self, rank: int) -> KVConnector:
        """The rank's scheduler half (called on the driver when the engine builds its schedulers)."""

    def worker_side(self, rank: int) -> WorkerKVConnector:
        """The rank's worker half, a `WorkerKVConnector` (called by the rank's worker when it builds its runner)."""


@runtime_checkable
class TensorParallelKVConnector(KVConnectorFactory, Protocol):
    """A factory bound to a TP layout (EngineArgs calls it when tensor_parallel_size > 1): the remote connector
    (engine/kv_transfer/remote.py) saves or loads each rank's own heads, the offload tiers keep each rank's cache."""

    def for_tensor_parallel(self, tp_size: int, num_kv_heads: int, states: bool = False,
                            world_size: int = 1) -> KVConnectorFactory:
        """This connector for an engine of `tp_size` ranks per TP group (0 kv heads: a latent, whole per rank)."""


@runtime_checkable
class ConfigurableKVConnector(KVConnectorFactory, Protocol):
    """A factory that learns the sized engine before its scheduler halves exist (the offload tiers: one block's
    bytes, which the driver cannot read from ranks in other processes)."""

    def configure(self, engine_config: EngineConfig) -> None:
        """Called once by the engine with its final EngineConfig."""


__all__ = ["ConfigurableKVConnector", "KVConnectorFactory", "TensorParallelKVConnector"]
