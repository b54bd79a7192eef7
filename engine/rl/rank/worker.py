"""A rank's RL calls (docs/rl.md), a mixin of Worker: weight updates written in place through the rank's load plan
(from disk, from tensors, from a trainer's broadcast: engine/rl/rank/weight_sync.py), and sleep / wake-up
(engine/rl/rank/sleep_mode.py). The engine checks each call first and runs no step meanwhile.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ...config.worker_config import WorkerConfig
    from ...rank.model_runner import ModelRunner


class RLWorker:
    """Worker's RL calls (its runner, config, device and rank are the Worker's)."""

    if TYPE_CHECKING:
        config: WorkerConfig
        runner: ModelRunner
        device: torch.device
        rank: int

        def _bind_device(self) -> None: ...

    def rollback_bytes_needed(self, names: tuple[str, ...] | None) -> int:
        """The old bytes this rank would save to roll back an update of `names` (None: every served tensor): the
        driver refuses an update past rollback_bytes before anything is written or broadcast."""
        from ...rank.loader import update_plan
        from .rollback import old_bytes

        self._bind_device()
        return old_bytes(update_plan(self.runner.model, self.config.model, None if names is None else set(names)))

    def update_weights_from_disk(self, update):
        """A checkpoint's values into this rank's weights, in place (engine/rl/weights.py): its own experts and TP
        shard, read as the load read them (loader.update_in_place). The engine checked the tensors' headers first
        and runs no step meanwhile. All or nothing: the bytes overwritten are saved first (at most
        update.rollback_bytes, engine/rl/rank/rollback.py); a failure (a NaN or inf, a tensor unreadable or of another
        shape, a file gone) restores them at once and is answered, not raised; a rank that wrote everything keeps
        them until the driver's finish_weights_update. A DiskUpdateResult."""
        from ...contract.weight_sync import DiskUpdateResult
        from ...rank.loader import update_in_place
        from .rollback import UndoLog, roll_back

        undo = UndoLog(update.rollback_bytes) if update.rollback_bytes else None
        self.__dict__["_disk_undo"] = None

        def write(model) -> DiskUpdateResult:
            try:
                read = update_in_place(model, self.config.model, update.model_path, self.device, undo,
                                       update.bounds)
            except Exception as exc:  # answered: a raised error is this rank's death to the Ray executor
                why = str(exc)
                error = roll_back(undo)
                return DiskUpdateResult(0, why if error is None else f"{why}; {error}",
                                        rolled_back=undo is not None and error is None)
            self.__dict__["_disk_undo"] = undo
            return DiskUpdateResult(read)

        return self._write_weights(write)

    def update_weights_from_tensor(self, tensors: dict) -> int:
        """Named tensors into this rank's weights, in place: the parts of them this rank holds (its experts, its TP
        shard; loader.update_tensors_in_place). The engine checked them first and runs no step meanwhile."""
        from ...rank.loader import update_tensors_in_place

        return self._write_weights(
            lambda model: update_tensors_in_place(model, self.config.model, tensors, self.device))

    def init_weights_update_group(self, spec) -> str | None:
        """Begin joining a trainer's group as spec.rank_offset + this rank, on a thread of its own
        (engine/rl/rank/weight_sync.py): the rank's steps run on meanwhile. None, or why it cannot begin."""
        return self._update_groups().join(spec, self.rank)

    def weights_update_group_status(self, group_name: str):
        """A JoinStatus: this rank's end of `group_name` joining, joined or failed."""
        return self._update_groups().join_status(group_name)

    def update_weights_from_distributed(self, update):
        """A trainer's broadcast of `update`'s tensors, received a bucket at a time, each bucket written in place
        (the parts this rank holds: loader.update_tensors_in_place). The engine checked the names first and runs no
        step meanwhile. A DistributedUpdateResult (its error set, not raised, when the trainer failed)."""
        from ...rank.loader import update_tensors_in_place

        groups = self._update_groups()
        return self._write_weights(lambda model: groups.receive(
            update, lambda tensors, undo: update_tensors_in_place(model, self.config.model, tensors, self.device,
                                                                  undo)))

    def finish_weights_update(self, commit: bool) -> str | None:
        """Keep the last broadcast update (commit) or restore the bytes it overwrote (another rank failed); None, or
        why the restore failed (engine/rl/rank/rollback.py)."""
        from .rollback import finish

        groups = self._update_groups()
        disk, self.__dict__["_disk_undo"] = self.__dict__.get("_disk_undo"), None
        errors = self._write_weights(lambda model: [finish(disk, commit), groups.finish(commit)])
        return next((e for e in errors if e), None)

    def destroy_weights_update_group(self, group_name: str) -> bool:
        """Leave a trainer's group, or drop a join still pending; False when this rank had neither."""
        return self._update_groups().destroy(group_name)

    def sleep(self, level: int) -> int:
        """Give this rank's device memory back (engine/rl/rank/sleep_mode.py): level 1 the weights to host memory and
        the KV cache freed, level 2 the weights dropped too; the bytes freed. The engine runs no step meanwhile."""
        from ...rank.loader import plan_destinations
        from .sleep_mode import SleepState

        self._bind_device()
        self.runner.quiesce(60.0)
        state = self.__dict__.setdefault("_sleep_state", SleepState())
        model = self.runner.model
        freed = state.sleep(level, model, plan_destinations(model, self.config.model) if level == 2 else [],
                            self.runner.kv_caches)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the freed blocks back to the device, where the trainer can use them
        return freed

    def wake_up(self, tags: tuple[str, ...]) -> dict:
        """Give the released parts named by `tags` ("weights", "kv_cache") their memory back; graphs are captured
        again where a storage moved. {"bytes", "seconds", "graphs_recaptured"}."""
        from .sleep_mode import SleepState, wake_runner

        self._bind_device()
        state = self.__dict__.setdefault("_sleep_state", SleepState())
        return wake_runner(state, self.runner, tags, self.device)

    def _update_groups(self):
        from .weight_sync import UpdateGroups

        groups = self.__dict__.get("_weight_update_groups")
        if groups is None:
            groups = self._weight_update_groups = UpdateGroups(self.device)
        return groups

    def _write_weights(self, write):
        """A weight update's write on this rank, no launched step's device work still reading the weights; what
        `write` returns (the bytes read)."""
        self._bind_device()
        self.runner.quiesce(60.0)
        asleep = self.__dict__.get("_sleep_state")
        if asleep is not None and "weights" in asleep.parts:  # an update while asleep writes into the weights' bytes
            self.wake_up(("weights",))
        read = write(self.runner.model)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host sync: the copies are in before the engine's next step
        return read
