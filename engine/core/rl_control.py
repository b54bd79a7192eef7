"""The engine's RL control calls (docs/rl.md), SGLang's names: weight updates from disk, from tensors and from a
trainer's process group, the weight version, the prefix-cache flush. `LLMEngine` takes them from `RLControl`.

The driver checks every update against the served checkpoint before any rank writes or any tensor is broadcast
(engine/rl/weights.py); the ranks write in place through the plan their load used (engine/rank/loader.py, and
engine/rank/weight_sync.py for a trainer's broadcast), reached only through the executor's typed rank calls
(engine/contract/worker_api.py).

An update from disk or a broadcast that fails part way (a NaN or inf in a later tensor, a file gone mid-read, the
trainer died or went silent past the group's timeout, a bucket that cannot be written) is rolled back on every rank:
each saved the bytes it overwrote (engine/rank/rollback.py, at most `rollback_bytes`; every rank's need is asked for
and checked against it before anything is read or broadcast), so the weights are bitwise as before and the engine
serves on. Only without a rollback
(`rollback_bytes=0`, or a restore that failed) does it leave a model of two versions: the engine then refuses every
new request, naming the tensor, until an update covering the names of the failed one lands (`_stale`). A group whose
transport failed is destroyed; after a bucket that could not be written it is kept.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from ..contract.weight_sync import (DEFAULT_BUCKET_BYTES, DEFAULT_ROLLBACK_BYTES, DEFAULT_TIMEOUT_S, DiskUpdate,
                                    DistributedUpdate, UpdateGroupSpec, check_rollback_bytes)
from ..contract.worker_api import RankCall
from .rl_memory import MemoryControl, NotServing

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from moelink.scheduler.interface import SchedulerInterface

    from ..cluster.executor import Executor
    from ..config.engine_args import EngineConfig


PAUSE_MODES = ("abort", "wait", "keep")


class ControlDisabled(ValueError):
    """A control call on an engine started without enable_weight_updates (a server answers FAILED_PRECONDITION)."""


class RLControl(MemoryControl):
    """The RL control calls of LLMEngine (a mixin: the engine's executor, config and schedulers are its state)."""

    if TYPE_CHECKING:
        executor: Executor
        config: EngineConfig
        schedulers: list[SchedulerInterface]

        def _drain_core(self) -> list: ...

        def _process(self, core_outputs: list) -> list: ...

        _output_sink: Callable[[list], None] | None

        def has_unfinished_requests(self) -> bool: ...

        def abort_requests(self, request_ids, reason: str = "abort") -> list: ...

        _rank_of: dict[str, int]

    weight_version: str | None = None  # set by the caller with each weight update (SGLang's weight_version)
    # After a broadcast that failed part way: the names it was to write that no later update has written, and why.
    _stale: tuple[set[str], str] | None = None
    _update_groups: dict[str, UpdateGroupSpec] | None = None  # groups the ranks joined, by name

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None,
                                 weight_version: str | None = None, flush_cache: bool = True,
                                 rollback_bytes: int | None = None) -> dict:
        """Write the checkpoint at `model_path` (the served architecture, new values) into every rank's weights in
        place (engine/rl/weights.py); the prefix cache (and with it every offload tier's view) is flushed, since KV
        computed with the old weights must never be served with the new. Requests must be done first: one request
        never mixes weights. All or nothing, as update_weights_from_distributed: each rank saves the bytes it
        overwrites (at most `rollback_bytes` of host memory, checked before anything is read; 0: no rollback; None:
        `_rollback_limit`'s default), and an update that fails on any rank is rolled back on every rank. Returns
        {"bytes_read", "seconds", "weight_version"}."""
        self._check_enabled("update_weights_from_disk")
        from ..rl.weights import check_same_tensors, served_names

        if load_format not in (None, "auto", "safetensors"):
            raise ValueError(f"load_format={load_format!r} is invalid for a weight update: choose from None, 'auto' "
                             "or 'safetensors'.")
        if rollback_bytes is not None:  # checked before any rank is asked (None: _rollback_limit's default)
            check_rollback_bytes(rollback_bytes)
        self._check_update_allowed(flush_cache)
        check_same_tensors(self.config.model, self.config.model.model, model_path)
        rollback_bytes = self._rollback_limit(None, rollback_bytes)
        update = DiskUpdate(str(model_path), rollback_bytes)
        t0 = time.perf_counter()
        self._drain_for_update()  # a step still in flight (the overlapped loop) ends before any rank writes
        self._before_write()
        results = self.executor.collective(RankCall.UPDATE_WEIGHTS_FROM_DISK, update)
        failed = [r for r in results if r.error is not None]
        names = served_names(self.config.model, self.config.model.model)
        if failed:  # no rank says what it wrote: without a rollback every tensor counts as stale
            self._settle(rollback_bytes, failed, names, True, f"a weight update from {str(model_path)!r} failed part "
                         "way")
            raise RuntimeError(f"update_weights_from_disk failed: {failed[0].error}. " + self._after_failure())
        self._settle(rollback_bytes, failed, names, False, "")
        self.weight_version = weight_version
        self._stale = None  # every tensor written
        return {"bytes_read": sum(r.bytes_read for r in results), "seconds": time.perf_counter() - t0,
                "weight_version": weight_version}

    def update_weights_from_tensor(self, named_tensors, load_format: str | None = None,
                                   weight_version: str | None = None, flush_cache: bool = True) -> dict:
        """SGLang's update_weights_from_tensor: [(checkpoint name, tensor)] of the served checkpoint (any subset, a
        float tensor in any float dtype) written in place on every rank that holds part of it; the rest of the weights
        stay. As update_weights_from_disk otherwise (refusals, cache flush, weight_version)."""
        self._check_enabled("update_weights_from_tensor")
        from ..rl.weights import check_named_tensors

        if load_format not in (None, "auto"):
            raise ValueError(f"load_format={load_format!r} is invalid for a tensor update: choose None or 'auto'.")
        self._check_update_allowed(flush_cache)
        tensors = check_named_tensors(self.config.model, self.config.model.model, named_tensors)
        out = self._update_ranks(RankCall.UPDATE_WEIGHTS_FROM_TENSOR, tensors, weight_version)
        self._written(set(tensors))
        return out

    # -- a trainer's process group ------------------------------------------------------------------------------
    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "gloo",
                                  timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
        """Every rank joins the trainer's group (the trainer is its rank 0 and serves the rendezvous at
        master_address:master_port; engine rank r is rank_offset + r); the trainer makes its group at the same
        time. {"success", "message"} as SGLang answers; a failed join raises naming why."""
        self._check_enabled("init_weights_update_group")
        spec = UpdateGroupSpec(master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s)
        spec.check_ranks(self.config.parallel.world_size)
        groups = self._groups()
        if group_name in groups:
            raise ValueError(f"group_name={group_name!r} is invalid: a group of that name is joined already "
                             "(destroy_weights_update_group first).")
        errors = [e for e in self.executor.collective(RankCall.INIT_WEIGHTS_UPDATE_GROUP, spec) if e is not None]
        if errors:
            self.executor.collective(RankCall.DESTROY_WEIGHTS_UPDATE_GROUP, group_name)  # the ranks that joined
            raise RuntimeError(f"init_weights_update_group: {errors[0]}")
        groups[group_name] = spec
        return {"success": True, "message": f"joined group {group_name!r} as ranks {rank_offset}.."
                                            f"{rank_offset + self.config.parallel.world_size - 1} of {world_size}"}

    def update_weights_from_distributed(self, names, dtypes, shapes, group_name: str = "weight_update_group",
                                        flush_cache: bool = True, weight_version: str | None = None,
                                        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                                        rollback_bytes: int | None = None) -> dict:
        """Receive the tensors the trainer broadcasts (rank 0 of `group_name`, each tensor whole, in the order of
        `names`) on every rank, a bucket of at most `bucket_bytes` at a time, each rank writing the parts it holds
        in place. Checked against the served checkpoint before the trainer is listened to. All or nothing: each
        rank saves the bytes it overwrites (at most `rollback_bytes` of host memory; 0: no rollback; None:
        `_rollback_limit`'s default), and an update that fails on any rank is rolled back on every rank
        (engine/rank/rollback.py). As the other updates
        otherwise (refusals, cache flush, weight_version); {"bytes_read", "seconds", "weight_version"}."""
        self._check_enabled("update_weights_from_distributed")
        from ..rl.weights import check_tensor_specs

        if group_name not in self._groups():
            raise ValueError(f"group_name={group_name!r} is invalid: no such weight update group "
                             "(init_weights_update_group first; a destroyed or failed group is gone).")
        self._check_update_allowed(flush_cache)
        specs, requantize = check_tensor_specs(self.config.model, self.config.model.model, names, dtypes, shapes)
        DistributedUpdate(group_name, specs, bucket_bytes, requantize,  # the fields' checks, before any rank
                          0 if rollback_bytes is None else rollback_bytes)
        quantized = dict(requantize)  # a float weight sent for a quantized one writes the served parts it becomes
        rollback_bytes = self._rollback_limit(tuple(sorted({part for n, _, _ in specs for part in (
            quantized[n].names if n in quantized else (n,))})), rollback_bytes)
        update = DistributedUpdate(group_name, specs, bucket_bytes, requantize, rollback_bytes)
        t0 = time.perf_counter()
        self._drain_for_update()
        self._before_write()
        results = self.executor.collective(RankCall.UPDATE_WEIGHTS_FROM_DISTRIBUTED, update)
        failed = [r for r in results if r.error is not None]
        lost = any(r.group_lost for r in results)
        self._settle(rollback_bytes, failed, {n for n, _, _ in update.tensors},
                     any(r.tensors_written for r in results), f"a weight update from group {group_name!r} failed part way")
        if failed:
            if lost:
                self._groups().pop(group_name, None)
                self.executor.collective(RankCall.DESTROY_WEIGHTS_UPDATE_GROUP, group_name)  # every rank
            raise RuntimeError(f"update_weights_from_distributed failed: {failed[0].error}. " + self._after_failure()
                               + ("" if lost else f" Group {group_name!r} is kept for the next update."))
        self.weight_version = weight_version
        self._written({n for n, _, _ in update.tensors})
        return {"bytes_read": sum(r.bytes_received for r in results), "seconds": time.perf_counter() - t0,
                "weight_version": weight_version}

    def _rollback_limit(self, names: tuple[str, ...] | None, rollback_bytes: int | None) -> int:
        """The rollback bound every rank gets for an update of `names` (None: every served tensor), settled before
        anything is read or broadcast: each rank sizes its own part (engine/rank/rollback.py). A bound the caller
        gave is kept, or the update refused when some rank's old bytes pass it. None (the default; SGLang's and
        vLLM's callers send none): DEFAULT_ROLLBACK_BYTES when every rank's part fits in it, else no rollback,
        logged: a whole-model update of a large model would otherwise need a host copy of every rank's weights, and
        an update that fails part way without one leaves the model refusing requests until a complete update
        lands, never serving mixed weights."""
        if not rollback_bytes and rollback_bytes is not None:
            return 0
        needed = self.executor.collective(RankCall.ROLLBACK_BYTES_NEEDED, names)
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

    def _settle(self, rollback_bytes: int, failed: list, names: set[str], wrote: bool, stale_why: str) -> None:
        """Every rank answered an update: each keeps it, or (one failed) each restores what it wrote; the prefix
        cache is flushed. A failure that could not be rolled back (rollback_bytes=0, a restore that failed) after
        a rank wrote something leaves `names` stale: requests are refused until an update of them lands."""
        undo_errors: list[str] = []
        if rollback_bytes:  # every rank keeps it, or every rank restores what it wrote
            undo_errors = [e for e in self.executor.collective(RankCall.FINISH_WEIGHTS_UPDATE, not failed) if e]
        self.flush_cache()
        if not failed:
            return
        self._rolled_back = bool(rollback_bytes) and not undo_errors and all(r.rolled_back for r in failed)
        if not self._rolled_back and wrote:
            self._stale = ((self._stale[0] if self._stale else set()) | set(names),
                           f"{stale_why}: {failed[0].error}" + (f" ({undo_errors[0]})" if undo_errors else ""))

    _rolled_back = False  # the last failed update was rolled back on every rank

    def _after_failure(self) -> str:
        """What a failed update left, for its error."""
        if self._stale:
            return "The weights are partly updated: requests are refused until an update of the same tensors lands."
        return ("The weights are as they were" + (" (rolled back on every rank)" if self._rolled_back else "")
                + ", and the engine serves them.")

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> dict:
        """Every rank leaves the group; a group not joined is refused naming it."""
        self._check_enabled("destroy_weights_update_group")
        if self._groups().pop(group_name, None) is None:
            raise ValueError(f"group_name={group_name!r} is invalid: no such weight update group.")
        self.executor.collective(RankCall.DESTROY_WEIGHTS_UPDATE_GROUP, group_name)
        return {"success": True, "message": f"destroyed group {group_name!r}"}

    def _check_enabled(self, call: str) -> None:
        """The control calls that change weights or hold requests are taken only when the engine was started to."""
        if not self.config.enable_weight_updates:
            raise ControlDisabled(f"{call} is refused: start the engine with enable_weight_updates=True "
                             "(--enable-weight-updates) to take RL control calls.")

    def _groups(self) -> dict[str, UpdateGroupSpec]:
        if self._update_groups is None:
            self._update_groups = {}
        return self._update_groups

    def _written(self, names: set[str]) -> None:
        """An update wrote `names`: the tensors a failed broadcast left stale are fewer (none: serve again)."""
        if self._stale is not None:
            left = self._stale[0] - names
            self._stale = (left, self._stale[1]) if left else None

    def check_weights_whole(self) -> None:
        """Refuse a request while the engine is asleep, or a failed broadcast (or sleep level 2) left the weights
        incomplete."""
        self.check_awake()
        if self._stale is not None:
            left, why = self._stale
            raise NotServing(f"requests are refused: {why}; {len(left)} tensor(s) (e.g. {sorted(left)[0]!r}) are "
                               "still to be written by a complete update (update_weights_from_disk, or the same names "
                               "again).")

    # -- pause / continue (SGLang's pause_generation, continue_generation) ---------------------------------------
    _pause_mode: str | None = None
    # Requests an update reached while held ("keep"): the versions their KV and tokens so far came from, sent once
    # with their next output (EngineCoreOutput.earlier_weight_versions).
    _earlier_versions: dict[str, list] | None = None

    def pause_generation(self, mode: str = "abort", clear_cache: bool = False) -> dict:
        """Stop generating until continue_generation. "abort": every request the engine holds is aborted (finish
        reason "abort"). "wait": nothing new starts; requests already started run on to their end (step the engine
        until `started_requests()` is empty, then update). "keep": nothing is scheduled; started requests keep their
        KV and resume on continue; an update meanwhile is allowed, and they go on with the new weights (SGLang's
        in-place pause): their outputs name every version they came from (RequestOutput.weight_versions). Requests
        added while paused wait. `clear_cache` (vLLM's pause; SGLang's has none, so False by default): forget every
        cached prefix once paused (flush_cache). With "keep" it is refused: vLLM would recompute the held requests'
        KV under the new weights, and moelink keeps it. {"mode", "aborted", "started"} (+ "num_blocks_freed")."""
        self._check_enabled("pause_generation")
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode={mode!r} is invalid: choose from {', '.join(PAUSE_MODES)}.")
        if not isinstance(clear_cache, bool):
            raise ValueError(f"clear_cache={clear_cache!r} is invalid: must be true or false.")
        if clear_cache and mode == "keep":
            raise ValueError("clear_cache=true is not taken with mode='keep': held requests keep their KV here (their "
                             "tokens after an update name both weight versions), where vLLM would recompute it; pass "
                             "clear_cache=false, or pause with mode='abort' or 'wait'.")
        aborted: list = []
        if mode == "abort":
            aborted = self.abort_requests(list(self._rank_of))
        self._pause_mode = mode
        for sched in self.schedulers:
            sched.admit_new = False
        info = {"mode": mode, "aborted": len(aborted), "started": len(self.started_requests())}
        if clear_cache:
            info["num_blocks_freed"] = self.flush_cache()
        return info

    def continue_generation(self) -> dict:
        """Generate again after pause_generation (requests held in "keep" resume where they were)."""
        self._check_enabled("continue_generation")
        was, self._pause_mode = self._pause_mode, None
        for sched in self.schedulers:
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
        return [rid for sched in self.schedulers for rid in sched.started_request_ids()]

    def _stamp_versions(self, core_outputs) -> None:
        """Each core output is labelled with the version of the weights that computed it (the step loop's collect)."""
        earlier = self._earlier_versions
        for co in core_outputs:
            co.weight_version = self.weight_version
            if earlier:
                co.earlier_weight_versions = tuple(earlier.pop(co.request_id, ())) or None

    def _forget_versions(self, request_ids) -> None:
        if self._earlier_versions:
            for rid in request_ids:
                self._earlier_versions.pop(rid, None)

    # Single-thread use: outputs of a step an update drained, returned by the next `step` (LLMEngine.step).
    _stashed_outputs: list | None = None

    def _drain_for_update(self) -> None:
        """Collect the step in flight before any rank writes; its outputs go where a step's go (the output thread's
        sink, or the next `step`'s return), never lost: a request may have finished in it."""
        core_outputs = self._drain_core()
        if not core_outputs:
            return
        if self._output_sink is not None:
            self._output_sink(core_outputs)
        else:
            self._stashed_outputs = (self._stashed_outputs or []) + self._process(core_outputs)

    def _before_write(self) -> None:
        """Requests held across this update (pause "keep"): their KV is of the old weights. They are noted (their
        outputs will say so) and their blocks never enter the prefix cache."""
        self._weights_written_while_asleep()
        started = {i: sched.started_request_ids() for i, sched in enumerate(self.schedulers)}
        if not any(started.values()):
            return
        if self._earlier_versions is None:
            self._earlier_versions = {}
        for i, ids in started.items():
            self.schedulers[i].exclude_from_prefix_cache(ids)
            for rid in ids:
                seen = self._earlier_versions.setdefault(rid, [])
                if not seen or seen[-1] != self.weight_version:
                    seen.append(self.weight_version)

    # -- the common tail ------------------------------------------------------------------------------------------
    def _update_ranks(self, call: RankCall, arg, weight_version: str | None) -> dict:
        """Every rank writes its part of a checked update (`call` with `arg`), then the prefix cache is flushed and
        the version set: {"bytes_read", "seconds", "weight_version"}."""
        t0 = time.perf_counter()
        self._drain_for_update()  # a step still in flight (the overlapped loop) ends before any rank writes
        self._before_write()
        read = self.executor.collective(call, arg)
        self.flush_cache()
        self.weight_version = weight_version
        return {"bytes_read": sum(read), "seconds": time.perf_counter() - t0, "weight_version": weight_version}

    def _check_update_allowed(self, flush_cache: bool) -> None:
        """What every weight update refuses (module engine/rl/): a kept prefix cache, a PD connector, running
        requests."""
        if not flush_cache:
            raise ValueError("flush_cache=False is not supported: the prefix cache holds KV of the old weights.")
        kvc = self.config.kv_connector
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
        elif self.has_unfinished_requests():
            raise ValueError("a weight update is refused while requests run: let them finish (or abort them) "
                             "first, so that no request mixes weights; or pause_generation first.")

    def flush_cache(self) -> int:
        """Forget every cached prefix on every rank (SGLang's flush_cache, vLLM's reset_prefix_cache); the number of
        blocks freed. Blocks of running requests stay theirs."""
        return sum(sched.reset_prefix_cache() for sched in self.schedulers)
