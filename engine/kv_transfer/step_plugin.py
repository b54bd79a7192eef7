"""KV transfer as a step plug-in (engine/contract/step_plugin.py): the worker half of the engine's KV connector
(engine/contract/kv_blocks.py `WorkerKVConnector`) bound to the rank's cache when it is allocated, the loads a step
plans (`SchedulerOutput.kv_transfers`) started before its forward and its saves after it, in the step's device work,
and the transfers that ended reported with every collected step."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..contract.kv_blocks import PagedKVBlocks, WorkerKVConnector, start_transfers
from ..contract.step_plugin import DeviceStep, RankModel, StepBatch, StepPlugin, StepWork

if TYPE_CHECKING:
    from moelink.scheduler.outputs import KVTransferPlan, ModelRunnerOutput, SchedulerOutput

    from ..config.worker_config import WorkerConfig


class _Transfers(StepWork[None]):
    def __init__(self, plugin: KVTransferPlugin, transfers: KVTransferPlan):
        self.plugin, self.transfers = plugin, transfers

    def before_forward(self, dev: DeviceStep) -> None:
        start_transfers(self.plugin.connector, self.transfers, self.plugin.blocks(), saves=False)

    def after_step(self, dev: DeviceStep) -> None:
        start_transfers(self.plugin.connector, self.transfers, self.plugin.blocks(), saves=True)


class KVTransferPlugin(StepPlugin):
    name = "kv_transfer"

    def __init__(self, connector: WorkerKVConnector):
        self.connector = connector
        self.kv_blocks: PagedKVBlocks | None = None  # the cache as the connector copies it (set with the cache)

    def blocks(self) -> PagedKVBlocks:
        if self.kv_blocks is None:
            raise RuntimeError("a step plans KV transfers before this rank's KV cache is allocated.")
        return self.kv_blocks

    def cache_allocated(self, blocks: Callable[[], PagedKVBlocks]) -> None:
        self.kv_blocks = blocks()
        allocated = getattr(self.connector, "cache_allocated", None)  # e.g. NIXL registers it now, at start
        if allocated is not None:
            allocated(self.kv_blocks)

    def plan(self, batch: StepBatch) -> StepWork | None:
        transfers = batch.so.kv_transfers
        return _Transfers(self, transfers) if transfers is not None else None

    def plan_idle(self, so: SchedulerOutput, runs: bool) -> StepWork | None:
        return _Transfers(self, so.kv_transfers) if so.kv_transfers is not None else None

    def collect(self, out: ModelRunnerOutput) -> None:
        out.kv_transfers_done = self.connector.poll()

    def reset(self) -> None:
        self.connector.drop_pending()  # an elastic rewind counted the transfers in flight failed

    def close(self) -> None:
        self.connector.close()  # its server socket and threads (engine/kv_transfer/remote.py)


class KVTransferFeature:
    """On with a KV connector (WorkerConfig.kv_connector: disaggregated prefill, KV offload): this rank's worker
    half of it."""

    name = KVTransferPlugin.name

    def make(self, rank: RankModel, config: WorkerConfig) -> StepPlugin | None:
        if config.kv_connector is None:
            return None
        return KVTransferPlugin(config.kv_connector.worker_side(rank.rank))


FEATURE = KVTransferFeature()
