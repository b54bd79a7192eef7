"""The engine's RL control calls (docs/rl.md), SGLang's names: weight updates from disk, from tensors and from a
trainer's process group, pause / continue, the weight version, the prefix-cache flush: `RLControl`, which `LLMEngine`
holds as `engine.rl` (with the memory calls as `engine.rl.memory`, engine/rl/memory.py) and builds with itself as the
`RLHost` (engine/rl/host.py: exactly what these calls need of the engine). The engine's step calls in only where it
must: a request's admission checks the weights are whole, a step stamps its outputs' weight version, a paused engine
schedules nothing.

The driver checks every update against the served checkpoint before any rank writes or any tensor is broadcast
(engine/rl/weights.py); the ranks write in place through the plan their load used (engine/rank/loader.py, and
engine/rl/rank/weight_sync.py for a trainer's broadcast), reached only through the executor's typed rank calls
(engine/contract/worker_api.py).

An update from disk or a broadcast that fails part way (a NaN or inf in a later tensor, a file gone mid-read, the
trainer died or went silent past the group's timeout, a bucket that cannot be written) is rolled back on every rank:
each saved the bytes it overwrote (engine/rl/rank/rollback.py, at most `rollback_bytes`; every rank's need is asked
for and checked against it before anything is read or broadcast), so the weights are bitwise as before and the
engine serves on. Only without a rollback (`rollback_bytes=0`, or a restore that failed) does it leave a model of two
versions: the engine then refuses every new request, naming the tensor, until an update covering the names of the
failed one lands (engine/rl/stale.py). A group whose transport failed is destroyed; after a bucket that could not be
written it is kept.

Nothing a caller names runs unbounded on the engine thread: an update from disk is checked in two halves,
`check_disk_update` (the new checkpoint's headers and index, read within bounds the served checkpoint sets, its files
inside its directory: any thread, a served engine runs it on one of its own) and `apply_disk_update` (the engine
thread: the ranks write); a join of a trainer's group is begun on every rank (`begin_weights_update_group`: each rank
joins on a thread of its own) and polled between steps (`poll_weights_update_group`), failed at its join_timeout_s
whatever torch's store client does; every weight_version is a bounded label (check_weight_version).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from ..config.checkpoint_headers import HeaderBounds
from ..contract.weight_sync import (DEFAULT_BUCKET_BYTES, DEFAULT_JOIN_TIMEOUT_S, DEFAULT_ROLLBACK_BYTES,
                                    DEFAULT_TIMEOUT_S, DiskUpdate, DistributedUpdate, UpdateGroupSpec,
                                    check_rollback_bytes, check_weight_version)
from ..contract.worker_api import RankCall
from .errors import GroupJoinFailed, check_enabled
from .memory import MemoryControl
from .stale import StaleWeights

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from moelink.scheduler.engine_output import EngineCoreOutput

    from ..config.model import ModelConfig
    from .host import RLHost


PAUSE_MODES = ("abort", "wait", "keep")
# Between two looks at a pending join's ranks (the Python API's own wait; a served engine polls from its loop).
JOIN_POLL_S = 0.02


@dataclass(frozen=True)
class CheckedDiskUpdate:
    """An update_weights_from_disk whose arguments and checkpoint headers were checked (`check_disk_update`, any
    thread), for `apply_disk_update` on the engine thread."""

    model_path: str
    weight_version: str | None
    flush_cache: bool
    rollback_bytes: int | None
    bounds: HeaderBounds  # the rank's own read of the checkpoint's index is bounded and confined too


@dataclass(frozen=True)
class GroupJoin:
    """A join every rank has begun (`begin_weights_update_group`), until `poll_weights_update_group` says it is done,
    failed or past `deadline` (time.monotonic())."""

    spec: UpdateGroupSpec
    deadline: float


class RLControl:
    """The RL control calls of an engine (`host`): its weight version, the trainer's groups, the pause, what a
    failed update left stale; `memory` is its sleep / wake_up."""

    def __init__(self, host: RLHost) -> None:
        self._host = host
        # After an update that failed part way (or sleep(level=2)): the names no later update has written, and why.
        self._stale = StaleWeights()
        self.memory = MemoryControl(host, self._stale, self.flush_cache)
        self.weight_version: str | None = None  # set by the caller with each weight update (SGLang's weight_version)
        self._update_groups: dict[str, UpdateGroupSpec] = {}  # groups the ranks joined, by name
        self._pending_joins: dict[str, GroupJoin] = {}  # joins begun and not yet polled done, by group name
        self._served: tuple | None = None  # the served checkpoint's tensors and the bounds an update is read within
        self._rolled_back = False  # the last failed update was rolled back on every rank
        self._pause_mode: str | None = None
        self._cache_stale = False  # an update with flush_cache=False left KV of older weights cached (not yet flushed)
        # Requests an update reached while held ("keep"): the versions their KV and tokens so far came from, sent
        # once with their next output (EngineCoreOutput.earlier_weight_versions).
        self._earlier_versions: dict[str, list[str | None]] = {}

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None,
                                 weight_version: str | None = None, flush_cache: bool = True,
                                 rollback_bytes: int | None = None) -> dict:
        """Write the checkpoint at `model_path` (the served architecture, new values) into every rank's weights in
        place (engine/rl/weights.py); the prefix cache (and with it every offload tier's view) is flushed, since KV
        computed with the old weights must never be served with the new. Requests must be done first: one request
        never mixes weights. All or nothing, as update_weights_from_distributed: each rank saves the bytes it
        overwrites (at most `rollback_bytes` of host memory, checked before anything is read; 0: no rollback; None:
        `_rollback_limit`'s default), and an update that fails on any rank is rolled back on every rank. Returns
        {"bytes_read", "seconds", "weight_version"}. `check_disk_update` then `apply_disk_update`."""
        return self.apply_disk_update(self.check_disk_update(model_path, load_format, weight_version, flush_cache,
                                                             rollback_bytes))

    def check_disk_update(self, model_path: str, load_format: str | None = None, weight_version: str | None = None,
                          flush_cache: bool = True, rollback_bytes: int | None = None) -> CheckedDiskUpdate:
        """update_weights_from_disk's checks that read files: its arguments, and the new checkpoint's headers against
        the served one's (within the served checkpoint's bounds, its files inside its directory). Reads the engine's
        configuration and the files only, so any thread may run it: a served engine runs it on a thread of its own,
        never the engine thread (a 1.4M-entry header stalled every user 18 s there before)."""
        self.check_enabled("update_weights_from_disk")
        from .weights import check_same_tensors

        if load_format not in (None, "auto", "safetensors"):
            raise ValueError(f"load_format={load_format!r} is invalid for a weight update: choose from None, 'auto' "
                             "or 'safetensors'.")
        if rollback_bytes is not None:  # checked before any rank is asked (None: _rollback_limit's default)
            check_rollback_bytes(rollback_bytes)
        check_weight_version(weight_version)
        if not isinstance(model_path, str) or not model_path:
            raise ValueError("model_path is invalid: must be a checkpoint directory's path.")
        served = self._served_checkpoint()
        check_same_tensors(*self._checkpoint(), model_path, served)
        return CheckedDiskUpdate(model_path, weight_version, flush_cache, rollback_bytes, served[1])

    def apply_disk_update(self, checked: CheckedDiskUpdate) -> dict:
        """The engine thread's half of update_weights_from_disk: the refusals that depend on what runs, then every
        rank writes (its own read of the checkpoint bounded and confined as the check's)."""
        self.check_enabled("update_weights_from_disk")
        self._check_update_allowed(checked.flush_cache)
        model_path, weight_version = checked.model_path, checked.weight_version
        rollback_bytes = self._rollback_limit(None, checked.rollback_bytes)
        update = DiskUpdate(model_path, rollback_bytes, checked.bounds)
        t0 = time.perf_counter()
        self._host.drain_for_update()  # a step still in flight (the overlapped loop) ends before any rank writes
        self._before_write()
        results = self._host.executor.collective(RankCall.UPDATE_WEIGHTS_FROM_DISK, update)
        failed = [r for r in results if r.error is not None]
        names = set(self._served_checkpoint()[0])
        if failed:  # no rank says what it wrote: without a rollback every tensor counts as stale
            self._settle(rollback_bytes, failed, names, True, f"a weight update from {model_path!r} failed part way")
            raise RuntimeError(f"update_weights_from_disk failed: {failed[0].error}. " + self._after_failure())
        self._settle(rollback_bytes, failed, names, False, "", checked.flush_cache)
        self.weight_version = weight_version
        self._stale.clear()  # every tensor written
        return {"bytes_read": sum(r.bytes_read for r in results), "seconds": time.perf_counter() - t0,
                "weight_version": weight_version}

    def _checkpoint(self) -> tuple[ModelConfig, str]:
        """The served model's configuration and its checkpoint's directory (what engine/rl/weights.py checks
        against)."""
        model = self._host.config.model
        return model, model.model

    def _served_checkpoint(self) -> tuple[dict[str, tuple], HeaderBounds]:
        """engine/rl/weights.served_tensors of the served checkpoint, read once (any thread: a race reads it twice)."""
        if self._served is None:
            from .weights import served_tensors

            self._served = served_tensors(*self._checkpoint())
        return self._served

    def update_weights_from_tensor(self, named_tensors, load_format: str | None = None,
                                   weight_version: str | None = None, flush_cache: bool = True) -> dict:
        """SGLang's update_weights_from_tensor: [(checkpoint name, tensor)] of the served checkpoint (any subset, a
        float tensor in any float dtype) written in place on every rank that holds part of it; the rest of the weights
        stay. As update_weights_from_disk otherwise (refusals, cache flush, weight_version)."""
        self.check_enabled("update_weights_from_tensor")
        from .weights import check_named_tensors

        if load_format not in (None, "auto"):
            raise ValueError(f"load_format={load_format!r} is invalid for a tensor update: choose None or 'auto'.")
        check_weight_version(weight_version)
        self._check_update_allowed(flush_cache)
        tensors = check_named_tensors(*self._checkpoint(), named_tensors)
        out = self._update_ranks(RankCall.UPDATE_WEIGHTS_FROM_TENSOR, tensors, weight_version, flush_cache)
        self._stale.written(set(tensors))
        return out

    # -- a trainer's process group ------------------------------------------------------------------------------
    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "gloo",
                                  timeout_s: float = DEFAULT_TIMEOUT_S,
                                  join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S) -> dict:
        """Every rank joins the trainer's group (the trainer is its rank 0 and serves the rendezvous at
        master_address:master_port; engine rank r is rank_offset + r); the trainer makes its group at the same
        time. `timeout_s`: the group's (a broadcast a rank waits for); `join_timeout_s`: the most the join may take.
        {"success", "message"} as SGLang answers; a failed join raises GroupJoinFailed naming why. Waits here, on
        the caller's thread (a served engine polls between steps instead: engine/api/rl_calls.py)."""
        join = self.begin_weights_update_group(master_address, master_port, rank_offset, world_size, group_name,
                                               backend, timeout_s, join_timeout_s)
        try:
            while True:
                done = self.poll_weights_update_group(join)
                if done is not None:
                    return done
                time.sleep(JOIN_POLL_S)
        except BaseException:
            self.abandon_weights_update_group(join)  # KeyboardInterrupt too: no rank keeps a join nobody awaits
            raise

    def begin_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                   group_name: str = "weight_update_group", backend: str = "gloo",
                                   timeout_s: float = DEFAULT_TIMEOUT_S,
                                   join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S) -> GroupJoin:
        """Check the call and start the join on every rank (each on a thread of its own: the rendezvous never runs
        on a rank's step thread or the engine thread, engine/rl/rank/weight_sync.py); returns at once."""
        self.check_enabled("init_weights_update_group")
        spec = UpdateGroupSpec(master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s,
                               join_timeout_s)
        spec.check_ranks(self._host.config.parallel.world_size)
        if group_name in self._update_groups:
            raise ValueError(f"group_name={group_name!r} is invalid: a group of that name is joined already "
                             "(destroy_weights_update_group first).")
        if group_name in self._pending_joins:
            raise ValueError(f"group_name={group_name!r} is invalid: a join of that group is still pending.")
        errors = [e for e in self._host.executor.collective(RankCall.INIT_WEIGHTS_UPDATE_GROUP, spec) if e is not None]
        if errors:
            self._host.executor.collective(RankCall.DESTROY_WEIGHTS_UPDATE_GROUP, group_name)  # the ranks that began
            raise GroupJoinFailed(f"init_weights_update_group: {errors[0]}")
        join = GroupJoin(spec, time.monotonic() + join_timeout_s)
        self._pending_joins[group_name] = join
        return join

    def poll_weights_update_group(self, join: GroupJoin) -> dict | None:
        """Ask every rank how its end of `join` stands: the call's answer once every rank joined, None while one is
        still joining; GroupJoinFailed (every rank's end dropped) when one failed or the join ran past its
        join_timeout_s."""
        spec = join.spec
        if self._pending_joins.get(spec.group_name) is not join:
            raise GroupJoinFailed(f"init_weights_update_group: the join of group {spec.group_name!r} was dropped.")
        statuses = self._host.executor.collective(RankCall.WEIGHTS_UPDATE_GROUP_STATUS, spec.group_name)
        failed = next((s for s in statuses if s.state == "failed"), None)
        where = f"group {spec.group_name!r} at {spec.master_address}:{spec.master_port}"
        if failed is None and all(s.state == "joined" for s in statuses):
            del self._pending_joins[spec.group_name]
            self._update_groups[spec.group_name] = spec
            return {"success": True, "message": f"joined group {spec.group_name!r} as ranks {spec.rank_offset}.."
                                                f"{spec.rank_offset + self._host.config.parallel.world_size - 1} of "
                                                f"{spec.world_size}"}
        if failed is None and time.monotonic() < join.deadline:
            return None
        self.abandon_weights_update_group(join)
        if failed is not None:
            raise GroupJoinFailed(f"init_weights_update_group: joining {where} failed: {failed.error}")
        waiting = next(s for s in statuses if s.state == "joining")
        why = {"resolving": f"the name {spec.master_address!r} did not resolve",
               "connecting": "nothing accepted a connection there (no trainer listening: connection refused or no "
                             "answer)",
               }.get(waiting.phase, "a listener there accepted the connection, but the trainer's store and group "
                                    "never answered (not a torch.distributed store, or a trainer that never made its "
                                    "group)")
        raise GroupJoinFailed(f"init_weights_update_group: joining {where} timed out after {spec.join_timeout_s:g} s "
                              f"(join_timeout_s): {why}. Every rank dropped its end.")

    def abandon_weights_update_group(self, join: GroupJoin) -> None:
        """Drop a pending join on every rank (its caller left, or it failed): a rank whose join is still inside
        torch's rendezvous leaves its thread there, and drops the group if it ever forms."""
        if self._pending_joins.get(join.spec.group_name) is join:
            del self._pending_joins[join.spec.group_name]
            self._host.executor.collective(RankCall.DESTROY_WEIGHTS_UPDATE_GROUP, join.spec.group_name)

    def update_weights_from_distributed(self, names, dtypes, shapes, group_name: str = "weight_update_group",
                                        flush_cache: bool = True, weight_version: str | None = None,
                                        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                                        rollback_bytes: int | None = None, packed: bool = False) -> dict:
        """Receive the tensors the trainer broadcasts (rank 0 of `group_name`, each tensor whole, in the order of
        `names`) on every rank, a bucket of at most `bucket_bytes` at a time, each rank writing the parts it holds
        in place. Checked against the served checkpoint before the trainer is listened to. All or nothing: each
        rank saves the bytes it overwrites (at most `rollback_bytes` of host memory; 0: no rollback; None:
        `_rollback_limit`'s default), and an update that fails on any rank is rolled back on every rank
        (engine/rl/rank/rollback.py). As the other updates
        otherwise (refusals, cache flush, weight_version); {"bytes_read", "seconds", "weight_version"}. `packed`:
        the trainer sends vLLM's packed broadcast (each bucket one uint8 buffer, `bucket_bytes` its
        packed_buffer_size_bytes: engine/contract/weight_sync.DistributedUpdate)."""
        self.check_enabled("update_weights_from_distributed")
        from .weights import check_tensor_specs

        check_weight_version(weight_version)
        if group_name not in self._update_groups:
            raise ValueError(f"group_name={group_name!r} is invalid: no such weight update group "
                             "(init_weights_update_group first; a destroyed or failed group is gone).")
        self._check_update_allowed(flush_cache)
        specs, requantize = check_tensor_specs(*self._checkpoint(), names, dtypes, shapes)
        DistributedUpdate(group_name, specs, bucket_bytes, requantize,  # the fields' checks, before any rank
                          0 if rollback_bytes is None else rollback_bytes, packed)
        quantized = dict(requantize)  # a float weight sent for a quantized one writes the served parts it becomes
        rollback_bytes = self._rollback_limit(tuple(sorted({part for n, _, _ in specs for part in (
            quantized[n].names if n in quantized else (n,))})), rollback_bytes)
        update = DistributedUpdate(group_name, specs, bucket_bytes, requantize, rollback_bytes, packed)
        t0 = time.perf_counter()
        self._host.drain_for_update()
        self._before_write()
        results = self._host.executor.collective(RankCall.UPDATE_WEIGHTS_FROM_DISTRIBUTED, update)
        failed = [r for r in results if r.error is not None]
        lost = any(r.group_lost for r in results)
        self._settle(rollback_bytes, failed, {n for n, _, _ in update.tensors},
                     any(r.tensors_written for r in results),
                     f"a weight update from group {group_name!r} failed part way", flush_cache)
        if failed:
            if lost:
                self._update_groups.pop(group_name, None)
                self._host.executor.collective(RankCall.DESTROY_WEIGHTS_UPDATE_GROUP, group_name)  # every rank
            raise RuntimeError(f"update_weights_from_distributed failed: {failed[0].error}. " + self._after_failure()
                               + ("" if lost else f" Group {group_name!r} is kept for the next update."))
        self.weight_version = weight_version
        self._stale.written({n for n, _, _ in update.tensors})
        return {"bytes_read": sum(r.bytes_received for r in results), "seconds": time.perf_counter() - t0,
                "weight_version": weight_version}

    def _rollback_limit(self, names: tuple[str, ...] | None, rollback_bytes: int | None) -> int:
        """The rollback bound every rank gets for an update of `names` (None: every served tensor), settled before
        anything is read or broadcast: each rank sizes its own part (engine/rl/rank/rollback.py). A bound the caller
        gave is kept, or the update refused when some rank's old bytes pass it. None (the default; SGLang's and
        vLLM's callers send none): DEFAULT_ROLLBACK_BYTES when every rank's part fits in it, else no rollback,
        logged: a whole-model update of a large model would otherwise need a host copy of every rank's weights, and
        an update that fails part way without one leaves the model refusing requests until a complete update
        lands, never serving mixed weights."""
        if not rollback_bytes and rollback_bytes is not None:
            return 0
        needed = self._host.executor.collective(RankCall.ROLLBACK_BYTES_NEEDED, names)
        rank = max(range(len(needed)), key=needed.__getitem__)
        if rollback_bytes is None:
            if needed[rank] <= DEFAULT_ROLLBACK_BYTES:
                return DEFAULT_ROLLBACK_BYTES
            logger.warning("this weight update is not rolled back if it fails: its old bytes on rank %d (%d) pass "
                           "the default rollback_bytes (%d); a failure part way leaves requests refused until a "
                           "complete update lands. Pass rollback_bytes=%d or more to roll it back.", rank,
                           needed[rank], DEFAULT_ROLLBACK_BYTES, needed[rank])
            return 0
        if needed[rank] > rollback_bytes:
            raise ValueError(f"rollback_bytes={rollback_bytes} is too small: rolling this update back would hold "
                             f"{needed[rank]} bytes of old weights on rank {rank} (its own experts and TP slice); "
                             f"raise rollback_bytes to at least {needed[rank]}, split the update into smaller calls, "
                             "or pass rollback_bytes=0 (no rollback). Nothing was written or received.")
        return rollback_bytes

    def _settle(self, rollback_bytes: int, failed: list, names: set[str], wrote: bool, stale_why: str,
                flush: bool = True) -> None:
        """Every rank answered an update: each keeps it, or (one failed) each restores what it wrote; the prefix
        cache is flushed (`flush=False`, after an update that landed: later, `_flush_after_update`). A failure
        that could not be rolled back (rollback_bytes=0, a restore that failed) after a rank wrote something leaves
        `names` stale: requests are refused until an update of them lands."""
        undo_errors: list[str] = []
        if rollback_bytes:  # every rank keeps it, or every rank restores what it wrote
            undo_errors = [e for e in self._host.executor.collective(RankCall.FINISH_WEIGHTS_UPDATE, not failed) if e]
        self._flush_after_update(flush or bool(failed))
        if not failed:
            return
        self._rolled_back = bool(rollback_bytes) and not undo_errors and all(r.rolled_back for r in failed)
        if not self._rolled_back and wrote:
            self._stale.add(set(names), f"{stale_why}: {failed[0].error}"
                            + (f" ({undo_errors[0]})" if undo_errors else ""))

    def _after_failure(self) -> str:
        """What a failed update left, for its error."""
        if self._stale:
            return "The weights are partly updated: requests are refused until an update of the same tensors lands."
        return ("The weights are as they were" + (" (rolled back on every rank)" if self._rolled_back else "")
                + ", and the engine serves them.")

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> dict:
        """Every rank leaves the group; a group not joined is refused naming it."""
        self.check_enabled("destroy_weights_update_group")
        if self._update_groups.pop(group_name, None) is None:
            raise ValueError(f"group_name={group_name!r} is invalid: no such weight update group.")
        self._host.executor.collective(RankCall.DESTROY_WEIGHTS_UPDATE_GROUP, group_name)
        return {"success": True, "message": f"destroyed group {group_name!r}"}

    def check_enabled(self, call: str) -> None:
        """Refuse `call` (ControlDisabled) unless the engine was started with enable_weight_updates."""
        check_enabled(self._host.config, call)

    def check_weights_whole(self) -> None:
        """Refuse a request while the engine is asleep, or a failed broadcast (or sleep level 2) left the weights
        incomplete."""
        if self.memory.released or self._stale.state is not None:  # plain reads: a served engine's admission
            self.memory.check_awake()  # enters no other RL module
            self._stale.check()
        if self._cache_stale:  # an update with flush_cache=False, and no flush since (_flush_after_update)
            self.flush_cache()

    # -- pause / continue (SGLang's pause_generation, continue_generation) ---------------------------------------
    def pause_generation(self, mode: str = "abort", clear_cache: bool = False) -> dict:
        """Stop generating until continue_generation. "abort": every request the engine holds is aborted (finish
        reason "abort"). "wait": nothing new starts; requests already started run on to their end (step the engine
        until `started_requests()` is empty, then update). "keep": nothing is scheduled; started requests keep their
        KV and resume on continue; an update meanwhile is allowed, and they go on with the new weights (SGLang's
        in-place pause): their outputs name every version they came from (RequestOutput.weight_versions). Requests
        added while paused wait. `clear_cache` (vLLM's pause; SGLang's has none, so False by default): forget every
        cached prefix once paused (flush_cache). With "keep" it is refused: vLLM would recompute the held requests'
        KV under the new weights, and moelink keeps it. {"mode", "aborted", "started"} (+ "num_blocks_freed")."""
        self.check_enabled("pause_generation")
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode={mode!r} is invalid: choose from {', '.join(PAUSE_MODES)}.")
        if not isinstance(clear_cache, bool):
            raise ValueError(f"clear_cache={clear_cache!r} is invalid: must be true or false.")
        if clear_cache and mode == "keep":
            raise ValueError("clear_cache=true is not taken with mode='keep': held requests keep their KV here (their "
                             "tokens after an update name both weight versions), where vLLM would recompute it; pass "
                             "clear_cache=false, or pause with mode='abort' or 'wait'.")
        aborted: Sequence[object] = ()
        if mode == "abort":
            aborted = self._host.abort_requests(self._host.scheduled_request_ids())
        self._pause_mode = mode
        for sched in self._host.schedulers:
            sched.admit_new = False
        info = {"mode": mode, "aborted": len(aborted), "started": len(self.started_requests())}
        if clear_cache:
            info["num_blocks_freed"] = self.flush_cache()
        return info

    def continue_generation(self) -> dict:
        """Generate again after pause_generation (requests held in "keep" resume where they were)."""
        self.check_enabled("continue_generation")
        self._flush_if_stale()  # requests that waited while paused may match cached prefixes now
        was, self._pause_mode = self._pause_mode, None
        for sched in self._host.schedulers:
            sched.admit_new = True
        return {"resumed_from": was}

    @property
    def paused(self) -> str | None:
        """The pause mode in force, or None."""
        return self._pause_mode

    def is_paused(self) -> bool:
        """Whether generation is paused (vLLM's is_paused): read-only, taken without enable_weight_updates."""
        return self._pause_mode is not None

    def started_requests(self) -> list[str]:
        """Requests that have been scheduled (they hold KV or tokens of the weights they ran with)."""
        return [rid for sched in self._host.schedulers for rid in sched.started_request_ids()]

    def stamp_versions(self, core_outputs: list[EngineCoreOutput]) -> None:
        """Each core output is labelled with the version of the weights that computed it (the step loop's collect)."""
        earlier = self._earlier_versions
        if self.weight_version is None and not earlier:
            return  # what every output already says (EngineCoreOutput's defaults): no loop over a step's outputs
        for co in core_outputs:
            co.weight_version = self.weight_version
            if earlier:
                co.earlier_weight_versions = tuple(earlier.pop(co.request_id, ())) or None

    def forget_versions(self, request_ids: Iterable[str]) -> None:
        """Requests that ended: no output of theirs is left to name earlier versions."""
        if self._earlier_versions:
            for rid in request_ids:
                self._earlier_versions.pop(rid, None)

    def _before_write(self) -> None:
        """Requests held across this update (pause "keep"): their KV is of the old weights. They are noted (their
        outputs will say so) and their blocks never enter the prefix cache."""
        self.memory.weights_written()
        started = {i: sched.started_request_ids() for i, sched in enumerate(self._host.schedulers)}
        if not any(started.values()):
            return
        for i, ids in started.items():
            self._host.schedulers[i].exclude_from_prefix_cache(ids)
            for rid in ids:
                seen = self._earlier_versions.setdefault(rid, [])
                if not seen or seen[-1] != self.weight_version:
                    seen.append(self.weight_version)

    # -- the common tail ------------------------------------------------------------------------------------------
    def _update_ranks(self, call: RankCall, arg, weight_version: str | None, flush: bool = True) -> dict:
        """Every rank writes its part of a checked update (`call` with `arg`), then the prefix cache is flushed and
        the version set: {"bytes_read", "seconds", "weight_version"}."""
        t0 = time.perf_counter()
        self._host.drain_for_update()  # a step still in flight (the overlapped loop) ends before any rank writes
        self._before_write()
        read = self._host.executor.collective(call, arg)
        self._flush_after_update(flush)
        self.weight_version = weight_version
        return {"bytes_read": sum(read), "seconds": time.perf_counter() - t0, "weight_version": weight_version}

    def _check_update_allowed(self, flush_cache: bool) -> None:
        """What every weight update refuses (module engine/rl/): a kept prefix cache, a PD connector, running
        requests."""
        if not isinstance(flush_cache, bool):
            raise ValueError(f"flush_cache={flush_cache!r} is invalid: must be True or False.")
        kvc = self._host.config.kv_connector
        if kvc is not None and getattr(kvc, "name", None) != "offload":
            # A PD peer computes KV with its own weights: two engines' versions would mix. (The offload tiers forget
            # their KV when the prefix cache is reset: engine/kv_transfer/offload.py.)
            raise ValueError(f"a weight update is not supported with kv_connector={type(kvc).__name__} "
                             "(prefill/decode disaggregation) yet: KV another engine computed with other weights "
                             "would be served.")
        if self._pause_mode == "keep":
            return  # held in place: they go on with the new weights, and say so (pause_generation)
        if self._pause_mode is not None:
            started = self.started_requests()
            if started:
                raise ValueError(f"a weight update is refused while started requests run ({len(started)}, e.g. "
                                 f"{started[0]!r}): paused with mode={self._pause_mode!r}, step the engine until they "
                                 "finish, or pause with mode='keep' to update them in place.")
        elif self._host.has_unfinished_requests():
            raise ValueError("a weight update is refused while requests run: let them finish (or abort them) "
                             "first, so that no request mixes weights; or pause_generation first.")

    def _flush_after_update(self, flush: bool) -> None:
        """The prefix cache after weights were written: flushed now, or (`flush=False`: SGLang's flush_cache=false,
        slime's and verl's, whose callers flush on their own, before the update or after it) marked as holding KV
        of older weights, flushed by the caller's own flush_cache or else at the first request admitted or the
        continue_generation after it, whichever comes first (`_flush_if_stale`): the update answers without it, and
        no request ever reads a prefix cached under the old weights."""
        if flush:
            self.flush_cache()
        else:
            self._cache_stale = True

    def _flush_if_stale(self) -> None:
        if self._cache_stale:
            self.flush_cache()

    def flush_cache(self) -> int:
        """Forget every cached prefix on every rank (SGLang's flush_cache, vLLM's reset_prefix_cache); the number of
        blocks freed. Blocks of running requests stay theirs."""
        self._cache_stale = False
        return sum(sched.reset_prefix_cache() for sched in self._host.schedulers)
