"""The calls the driver makes on every rank together: named by `RankCall`, typed by `RankAPI`.

`Executor.collective(RankCall.X, *args)` runs the Worker method of that name on every rank at once (in process,
or as Ray actor calls) and returns the results in rank order. The names are an enum, not free strings, so a
misspelt or removed call fails where it is written, and `RankAPI` states each call's arguments and result;
tests/engine/test_worker_api.py checks that the Worker implements every call with RankAPI's signature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from moelink.scheduler.outputs import ModelRunnerOutput

from .weight_sync import (DiskUpdate, DiskUpdateResult, DistributedUpdate, DistributedUpdateResult, JoinStatus,
                          UpdateGroupSpec)


class RankCall(str, Enum):
    """A Worker method every rank runs together (its value is the method's name)."""

    AVAILABLE_KV_BLOCKS = "available_kv_blocks"
    ALLOCATE_KV_CACHE = "allocate_kv_cache"
    WARM_UP = "warm_up"
    CAPTURED_GRAPH_SIZES = "captured_graph_sizes"
    EPLB_BEGIN = "eplb_begin"
    EPLB_SLOT_BYTES = "eplb_slot_bytes"
    EPLB_MOVE = "eplb_move"
    EPLB_COMMIT = "eplb_commit"
    EPLB_STATE = "eplb_state"
    ROLLBACK_BYTES_NEEDED = "rollback_bytes_needed"
    UPDATE_WEIGHTS_FROM_DISK = "update_weights_from_disk"
    UPDATE_WEIGHTS_FROM_TENSOR = "update_weights_from_tensor"
    INIT_WEIGHTS_UPDATE_GROUP = "init_weights_update_group"
    WEIGHTS_UPDATE_GROUP_STATUS = "weights_update_group_status"
    UPDATE_WEIGHTS_FROM_DISTRIBUTED = "update_weights_from_distributed"
    FINISH_WEIGHTS_UPDATE = "finish_weights_update"
    DESTROY_WEIGHTS_UPDATE_GROUP = "destroy_weights_update_group"
    SLEEP = "sleep"
    WAKE_UP = "wake_up"
    # Tests only (not a user flag): later move chunks pause, so a test can kill a rank mid-move.
    EPLB_TEST_SLOW_MOVES = "eplb_test_slow_moves"


@dataclass(frozen=True)
class LaunchedStep:
    """A step every rank was sent and has not been collected yet: what `Executor.launch` returns and
    `Executor.collect` takes (the overlapped loop launches step N+1 before it collects step N). `step_ids`: the step's
    id on each rank (the key of the rank's StepHandle); `outputs`: the outputs already in hand, where the executor
    ran the step at once (one that cannot overlap). An executor whose rank calls are still running subclasses it
    with its handles on them (engine/cluster/ray_executor.RayLaunchedStep)."""

    step_ids: tuple[int, ...]
    outputs: tuple[ModelRunnerOutput, ...] | None = None


PLANS = ("auto", "full", "minimal")


@dataclass(frozen=True)
class WarmupConfig:
    """The scheduler's limits a rank's warm-up plans its shapes from (its Worker knows the rest), and which
    plan: "full" (what the Triton kernels need), "minimal" (one small step), or "auto": full on the Triton
    kernels, minimal on the references (which compile nothing)."""

    max_num_batched_tokens: int
    max_num_seqs: int
    plan: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"WarmupConfig.{name}={v!r} is invalid: must be a positive integer.")
        if self.plan not in PLANS:
            raise ValueError(f"WarmupConfig.plan={self.plan!r} is invalid: choose from {', '.join(PLANS)}.")


@dataclass
class WarmupReport:
    """What one rank warmed: per phase, (name, variants run, seconds)."""

    rank: int
    phases: list[tuple[str, int, float]] = field(default_factory=list)

    @property
    def num_variants(self) -> int:
        return sum(n for _, n, _ in self.phases)

    @property
    def seconds(self) -> float:
        return sum(s for _, _, s in self.phases)


class RankAPI(Protocol):
    """What each `RankCall` takes and returns on one rank (engine/rank/worker.py implements it; its RL calls in
    engine/rl/rank/worker.py)."""

    def available_kv_blocks(self) -> int:
        """KV blocks this rank can hold after its weights."""

    def allocate_kv_cache(self, num_kv_blocks: int) -> None:
        """Allocate the KV cache (every rank the same number of blocks)."""

    def warm_up(self, cfg: WarmupConfig) -> WarmupReport:
        """Compile and run every kernel variant a step can hit (engine/rank/warmup.py)."""

    def captured_graph_sizes(self) -> tuple[int, ...]:
        """The decode batch sizes this rank replays graphs for."""

    def eplb_begin(self, placements) -> None:
        """Plan an expert move to `placements` (one per MoE layer)."""

    def eplb_slot_bytes(self) -> list[int]:
        """Bytes of one expert slot of each MoE layer."""

    def eplb_move(self, num_layers: int) -> bool:
        """Move and switch the next `num_layers` layers; True once every layer has switched."""

    def eplb_commit(self) -> tuple[int, int]:
        """End the move: bytes sent to other ranks, the most staged in one chunk."""

    def eplb_state(self) -> dict:
        """This rank's placement state."""

    def eplb_test_slow_moves(self, chunk_delay_s: float) -> None:
        """Tests only: later move chunks pause `chunk_delay_s`."""

    def rollback_bytes_needed(self, names: tuple[str, ...] | None) -> int:
        """The old bytes this rank would save to roll back an update of the served tensors `names` (None: all of
        them, an update from disk): its own parts only (its experts, its TP slice). Nothing is copied."""

    def update_weights_from_disk(self, update: DiskUpdate) -> DiskUpdateResult:
        """Write a checkpoint's values into this rank's weights in place (engine/rl/weights.py), saving the bytes it
        overwrites first (at most update.rollback_bytes); a failure is answered, the rank already restored."""

    def update_weights_from_tensor(self, tensors: dict) -> int:
        """Write named tensors into this rank's weights in place (the parts it holds); the bytes read."""

    def init_weights_update_group(self, spec: UpdateGroupSpec) -> str | None:
        """Begin joining a trainer's group as spec.rank_offset + this rank, on a thread of the rank's own (answers at
        once); None, or why it cannot begin."""

    def weights_update_group_status(self, group_name: str) -> JoinStatus:
        """How this rank's end of a group stands: joining (and what it waits for), joined, or failed (why)."""

    def update_weights_from_distributed(self, update: DistributedUpdate) -> DistributedUpdateResult:
        """Receive a trainer's broadcast a bucket at a time, each written in place (the parts this rank holds)."""

    def finish_weights_update(self, commit: bool) -> str | None:
        """After every rank answered an update: keep it (commit) or restore the bytes it overwrote; None, or why the
        restore failed."""

    def destroy_weights_update_group(self, group_name: str) -> bool:
        """Leave a trainer's group, or drop a join still pending; False when neither."""

    def sleep(self, level: int) -> int:
        """Release this rank's weights (level 1 to host memory, level 2 dropped) and KV cache; the bytes freed."""

    def wake_up(self, tags: tuple[str, ...]) -> dict:
        """Give the released parts named by `tags` their memory back; {"bytes", "seconds", "graphs_recaptured"}."""


def rank_call(method) -> RankCall:
    """`method` as a RankCall (a RankCall, or its name), or ValueError naming what is allowed."""
    try:
        return RankCall(method)
    except ValueError:
        allowed = ", ".join(c.value for c in RankCall)
        raise ValueError(f"collective method={method!r} is invalid: it must be a RankCall ({allowed}).") from None


__all__ = ["LaunchedStep", "RankAPI", "RankCall", "WarmupConfig", "WarmupReport", "rank_call"]
