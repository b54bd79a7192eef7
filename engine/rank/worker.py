"""Worker: one rank — its device, its process group, its share of the experts, its model runner.

The same class runs in-process (one rank) and inside a Ray actor (one per GPU
or CPU bundle); only the transport of `execute` differs.
"""
from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import threading
import weakref
from typing import Sequence
from dataclasses import replace

import torch

from moelink.scheduler.outputs import ModelRunnerOutput, SchedulerOutput

from ..contract.expert_parallel import ExpertParallelPlan
from .model_runner import ModelRunner
from ..rl.rank.worker import RLWorker
from .device_stream import make_stream
from ..contract.gc_policy import freeze_heap, park_keeps_heap_frozen
from ..contract.step_plugin import StepFeature, step_plugins
from .step_handle import StepHandle
from .step_plan import make_step_plan
from ..config.worker_config import WorkerConfig

logger = logging.getLogger(__name__)


class Worker(RLWorker):
    def __init__(self, config: WorkerConfig, rank: int, plan: ExpertParallelPlan,
                 step_features: Sequence[StepFeature] = ()):
        """`step_features`: the features the step takes as plug-ins (engine/cluster/step_features.STEP_FEATURES,
        handed over by the cluster, so the rank imports none of them); each makes its plug-in when `config` turns it
        on (engine/contract/step_plugin.py). Empty: a bare step (no speculative decoding, LoRA, images, structured
        output, KV connector, prompt logprobs, routed experts or routing replay)."""
        self.config = config
        self.step_features = tuple(step_features)
        self.rank = rank
        self.plan = plan  # the engine's, the same on every rank (engine/contract/expert_parallel.py)
        self.world_size = config.world_size
        self.device = self._pick_device(config.device)
        self.group = None
        self.tp = None  # this rank's TensorParallel (engine/tp/group.py) under TP, made with the process group
        self.runner: ModelRunner | None = None
        self._device_thread: int | None = None  # the thread _bind_device last made self.device current on
        self._mover = None  # an online-EPLB move under way (moe/expert_move.py ExpertMover)
        self._eplb_chunk_delay_s = 0.0  # tests only (eplb_test_slow_moves)
        self._preloaded = False  # a replacement's runner built before its group (preload); all-to-all to attach
        self._keeping = False  # a survivor keeping its runner (reconfigure_keep); `load` grows it to the new share
        self._refuse_keep: str | None = None  # tests only (elastic_test_refuse_keep)
        self._launched: dict[int, StepHandle] = {}  # step id -> StepHandle, launched and not yet collected
        if self._own_process():  # a rank process's imports (~200,000 objects) live as long as it does: frozen now,
            gc.freeze()  # the engine's collections (freeze_heap's too) walk only what it builds (~0.1 s a walk less)

    @staticmethod
    def _pick_device(device: torch.device) -> torch.device:
        if device.type == "cuda":
            # Ray gives each actor one GPU through CUDA_VISIBLE_DEVICES; in-process
            # we use the device the user named.
            index = 0 if os.environ.get("CUDA_VISIBLE_DEVICES") and device.index is None else (device.index or 0)
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return device

    # -- set-up ---------------------------------------------------------------
    def node_address(self) -> str:
        """An address the other ranks can reach this rank's node on."""
        return os.environ.get("MOELINK_MASTER_ADDR") or _node_ip()

    def pick_master(self) -> tuple[str, int]:
        """Rank 0 chooses the rendezvous: its own address and a port free right now."""
        from moelink.comm.process_group import find_free_port

        addr = self.node_address()
        return addr, find_free_port(addr)

    def _bind_device(self) -> None:
        """Make this rank's GPU the current one of the calling thread (once per thread). The current CUDA
        device is per thread, and the methods do not run where the constructor did: under Ray on the
        actor's task thread (the actor has a heartbeat thread too), in-process on AsyncEngine's thread."""
        if self.device.type == "cuda" and self._device_thread != threading.get_ident():
            torch.cuda.set_device(self.device)
            self._device_thread = threading.get_ident()

    def init_distributed(self, master_addr: str, master_port: int) -> None:
        if self.world_size == 1:
            return
        self._bind_device()
        from moelink.comm.process_group import init_process_group

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.group = init_process_group(self.rank, self.world_size, master_addr, master_port, backend,
                                        self.config.comm_timeout_s, local_addr=self.node_address())
        if self.config.tensor_parallel_size > 1:
            from moelink.engine.tp.group import make_tp_group

            # Every rank makes every TP group (torch's new_group is collective), in the same order; keeps its own.
            # Batch-invariant mode sums each element's partials in rank order (engine/tp/group.py).
            self.tp = make_tp_group(self.rank, self.world_size, self.config.tensor_parallel_size,
                                    ordered_sums=self.config.kernels == "batch_invariant")

    def load(self) -> None:
        self._bind_device()
        if self._preloaded:  # a replacement rank (engine/cluster/rejoin.py): only its all-to-all and KV cache are left
            self._attach_group()
            return
        if self._keeping:  # a survivor (engine/cluster/elastic.py): its runner grows to the new share, KV cache kept
            from .keep_runner import keep_runner

            self._keeping = False
            cfg = self.config
            keep_runner(self.runner, self._expert_parallel(), cfg.model.model, cfg.two_batch_overlap,
                        cfg.cuda_graph_sizes, load_format=cfg.load_format)
            return
        # World size 1 dispatches too when a fixed-capacity backend was named (the two-mode path on one rank,
        # needing no process group); otherwise one rank keeps its tokens local with no all-to-all at all.
        # (Under TP with the experts split by intermediate size the plan is one rank's: no all-to-all either.)
        ep = self._expert_parallel() if self.plan.world_size > 1 or self.plan.decode_capacity is not None else None
        self._build_runner(ep, self.config.num_kv_blocks)

    def _build_runner(self, ep, num_kv_blocks: int | None) -> None:
        cfg, rank = self.config, self.rank
        if self.device.type == "cpu" and self.world_size > 1:
            # Several ranks share this machine's cores: one intra-op thread each.
            torch.set_num_threads(1)
        elif self.device.type == "cpu" and cfg.cpu_reserved_cores and "OMP_NUM_THREADS" not in os.environ:
            # Cores left to the serving processes: torch's threads spin waiting for each other, so a thread that
            # shares its core with the front, the gateway or the client stalls every op of the step.
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - cfg.cpu_reserved_cores))
        self.runner = ModelRunner(cfg.model, cfg.block_size, num_kv_blocks, self.device,
                                  kernels=cfg.kernels, ep=ep, load_progress=cfg.load_progress and self.rank == 0,
                                  cuda_graph_sizes=cfg.cuda_graph_sizes,
                                  step_plan=make_step_plan(cfg.two_batch_overlap, self.world_size),
                                  stream=make_stream(self.device),
                                  load_format=cfg.load_format,
                                  num_state_slots=cfg.num_state_slots,
                                  num_state_checkpoints=cfg.num_state_checkpoints, tp=self.tp,
                                  # The features this configuration turns on, as the step's plug-ins (LoRA, images,
                                  # KV transfer, ...: engine/rank/step_features.py), made from the loaded model.
                                  plugins=lambda rank_model: step_plugins(self.step_features,
                                                                          replace(rank_model, rank=rank), cfg))

    def preload(self) -> bool:
        """A replacement rank, before it joins (engine/cluster/rejoin.py): load its share of `plan` (weights, placement
        tables) now, in the background, so that admission only forms the group and builds the all-to-all on it.
        False (nothing loaded; `load` does it all at admission) when CUDA graphs are on: their sizes are chosen
        from the all-to-all backend when the runner is built, and that backend needs the group."""
        from moelink.moe.layer import ExpertParallel

        if self.world_size == 1 or self.config.cuda_graph_sizes:
            return False
        self._bind_device()
        # The all-to-all comes with the group (`_attach_group`); no layer dispatches before then.
        p = self.plan.placement
        self._build_runner(ExpertParallel(self.rank, self.world_size, p, None, p.to_tensors(self.device)), None)
        self._preloaded = True
        return True

    def _attach_group(self) -> None:
        """Give the pre-loaded runner the all-to-all of the group just formed (every layer shares its
        ExpertParallel), then its KV cache when the size is configured (else the executor sizes it)."""
        self.runner.ep.all_to_all = self._expert_parallel().all_to_all
        self._preloaded = False
        if self.config.num_kv_blocks is not None:
            self.runner.allocate_kv_cache(self.config.num_kv_blocks)

    def reconfigure(self, rank: int, world_size: int, plan: ExpertParallelPlan) -> None:
        """Become rank `rank` of a new group of `world_size` (elastic EP, engine/cluster/elastic.py and rejoin.py): leave
        the old process group and drop the model runner (weights, KV cache), so that `init_distributed` and `load`
        build this rank's share of `plan` afresh. Runs after the old group's last step ended on this rank. A
        replacement that pre-loaded exactly this share keeps it."""
        self.shutdown(keep_connector=True)
        self._eplb_abort()  # a move the lost rank broke: its staging goes with it
        if self._preloaded and (rank, world_size) == (self.rank, self.world_size) and _same_plan(plan, self.plan):
            return  # (its runner, and the KV connector half bound to its cache, stay)
        if self.runner is not None:
            self.runner.close_plugins()  # a KV connector's half: the cache it is bound to goes with the runner
        self.runner = None  # freed before the new share loads: the budget holds one copy, not two
        self._preloaded = self._keeping = False
        self.rank, self.world_size, self.plan = rank, world_size, plan
        self.config = replace(self.config, world_size=world_size)

    def reconfigure_keep(self, rank: int, world_size: int, plan: ExpertParallelPlan) -> str | None:
        """`reconfigure` for a survivor that keeps its model runner (engine/rank/keep_runner.py): leave the old group
        and become rank `rank` of `world_size`; `load` then only grows the runner's experts to its share of
        `plan`. Returns None when it keeps, else why it cannot (then nothing but the group changed: the driver
        calls `reconfigure` on every rank, a full rebuild)."""

        from .keep_runner import free_device_bytes, keep_blocker

        self.shutdown(keep_connector=True)
        self._eplb_abort()  # a move the lost rank broke: its staging goes with it (its layers never switched)
        why = ("a pre-loaded replacement has no requests to keep" if self._preloaded else self._refuse_keep or
               keep_blocker(self.runner, self.rank, plan.placement.experts_on_rank(rank),
                            free_device_bytes(self.device, self.config.gpu_memory_utilization)))
        if why is not None:
            return f"rank {self.rank}: {why}"
        self._keeping = True
        self.rank, self.world_size, self.plan = rank, world_size, plan
        self.config = replace(self.config, world_size=world_size)
        return None

    def _expert_parallel(self):
        return self.plan.for_rank(self.group, self.rank, self.device)

    def available_kv_blocks(self) -> int:
        self._bind_device()
        return self.runner.available_kv_blocks(self.config.gpu_memory_utilization)

    def allocate_kv_cache(self, num_kv_blocks: int) -> None:
        self._bind_device()
        self.runner.allocate_kv_cache(num_kv_blocks)
        self._freeze_if_own_process()

    def warm_up(self, cfg):
        """Compile and run every kernel variant a step can hit (engine/rank/warmup.py), before the engine serves; the
        KV cache, the expert-load counters and the request states stay as they were. Every rank is called at
        once: the forward steps' all-to-alls pair up. Returns this rank's WarmupReport."""
        from .warmup import warm_up

        self._bind_device()
        report = warm_up(self.runner, cfg, rank=self.rank, progress=self.config.load_progress and self.rank == 0)
        self._freeze_if_own_process()
        return report

    # Set by the multiprocess executor's rank process (engine/cluster/mp_rank.py): its one Worker owns the process.
    own_process = False

    @classmethod
    def _own_process(cls) -> bool:
        """Whether this worker is a process of its own (a Ray actor, an mp rank), not an in-process rank of the
        engine's."""
        if cls.own_process:
            return True
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None

    @classmethod
    def _freeze_if_own_process(cls) -> None:
        """A Ray worker process is started once its cache (and warm-up) is in place: freeze its heap so the step
        loop's collections skip it (engine/contract/gc_policy.py). An in-process worker leaves that to its engine."""
        if cls._own_process():
            freeze_heap()

    # -- steps ----------------------------------------------------------------
    def execute(self, so: SchedulerOutput, run_forward: bool = True) -> ModelRunnerOutput:
        """Run one step and wait for it (the serial loop)."""
        self._bind_device()
        return self.runner.execute_model(so, run_forward)

    def launch(self, so: SchedulerOutput, run_forward: bool = True) -> None:
        """The overlapped loop: do the step's host work and put its device work on the stream; `collect` (called
        after the next step's launch) waits for it."""
        self._bind_device()
        self._launched[so.step_id] = self.runner.launch(so, run_forward)

    def collect(self, step_id: int) -> ModelRunnerOutput:
        """The output of a launched step (waits for the device; the only host sync of a step)."""
        self._bind_device()
        handle = self._launched.pop(step_id, None)
        if handle is None:
            raise ValueError(f"step_id={step_id} is invalid: no launched step of that id is waiting on rank "
                             f"{self.rank} (launched: {sorted(self._launched)}).")
        return handle.collect()

    def drop_launched(self) -> None:
        """Forget launched steps whose outputs will never be asked for (elastic EP: a step a loss broke)."""
        self._launched.clear()

    def captured_graph_sizes(self) -> tuple[int, ...]:
        """The decode batch sizes this rank replays graphs for (empty: none)."""
        graphs = self.runner.graphs if self.runner is not None else None
        return tuple(graphs.sizes) if graphs is not None else ()

    # -- online EPLB (moe/expert_move.py; driven by engine/cluster/eplb_controller.py between steps) ------------------
    def eplb_begin(self, placements) -> None:
        """Plan the move of this rank's MoE layers to `placements` (one per MoE layer); nothing moves yet."""
        from moelink.moe.expert_move import ExpertMover, moe_layers

        self._bind_device()
        self._eplb_abort()  # a move left behind (none in a healthy group) must not keep its staging
        layers = moe_layers(self.runner.model)
        self._mover = ExpertMover(layers, self.rank, self.group,
                                  [layer.placement for layer in layers],  # type: ignore[misc]  # EP layers: all set
                                  placements, self.device, chunk_delay_s=self._eplb_chunk_delay_s)

    def eplb_slot_bytes(self) -> list[int]:
        """Bytes of one expert slot of each MoE layer (all its tensors: weights, scales, biases)."""
        from moelink.moe.expert_move import moe_layers, slot_bytes

        return [slot_bytes(layer) for layer in moe_layers(self.runner.model)]

    def eplb_move(self, num_layers: int) -> bool:
        """Move and switch the next `num_layers` layers (collective); True once every layer has switched."""
        self._bind_device()
        if self._mover is None:
            raise RuntimeError("Worker.eplb_move without eplb_begin: no expert move is under way.")
        self._mover.move(num_layers)
        return self._mover.done

    def eplb_commit(self) -> tuple[int, int]:
        """End the move: the bytes this rank sent to other ranks and the most it staged in one chunk."""
        self._bind_device()
        mover, self._mover = self._mover, None
        if mover is None:
            raise RuntimeError("Worker.eplb_commit without eplb_begin: no expert move is under way.")
        mover.commit()
        return mover.bytes_sent, mover.peak_staged_bytes

    def _eplb_abort(self) -> None:
        if self._mover is not None:
            self._mover.abort()
            self._mover = None

    def eplb_state(self) -> dict:
        """This rank's placement state: each MoE layer's experts per slot, whether its routing tables are
        exactly its placement's, and the bytes a move holds staged (0 unless a chunk is under way)."""
        from moelink.moe.expert_move import moe_layers, tables_match_placement

        layers = moe_layers(self.runner.model) if self.runner is not None else []
        return dict(rank=self.rank, moving=self._mover is not None,
                    staged_bytes=self._mover.staged_bytes if self._mover is not None else 0,
                    layouts=[[list(layer.placement.experts_on_rank(r)) for r in range(layer.placement.ep_size)]
                             for layer in layers],
                    tables_match=[tables_match_placement(layer) for layer in layers])

    def eplb_test_slow_moves(self, chunk_delay_s: float) -> None:
        """Tests only (not a user flag): every later move chunk pauses `chunk_delay_s` after posting its
        transfers, long enough to kill a rank while a move is in flight."""
        self._eplb_chunk_delay_s = float(chunk_delay_s)

    def elastic_test_refuse_keep(self, reason: str | None) -> None:
        """Tests only (not a user flag): `reconfigure_keep` refuses with `reason` (None: decides as usual), so
        that a test reaches the full-rebuild fallback of a recovery without running out of memory."""
        self._refuse_keep = reason

    def ping(self) -> int:
        return self.rank

    def heartbeat(self) -> int:
        """This rank's process id. Under Ray it runs on a thread of its own (a concurrency group), so a
        rank answers while a step, a collective or a compile is running; only a frozen, wedged or
        unreachable process stays silent."""
        return os.getpid()

    def shutdown(self, keep_connector: bool = False) -> None:
        """Leave the group (and close the KV connector's worker half, unless `keep_connector`: a survivor that
        keeps its runner through a regroup keeps its cache, so the connector's saved KV and offload tiers stay
        valid in this process)."""
        # The overlapped loop: device work of launched steps may still run on the stream (a step a lost rank
        # broke, blocked in a collective until it fails); it must end before the group goes.
        self._launched.clear()
        if self.runner is not None:
            self.runner.quiesce(self.config.comm_timeout_s)
            if not keep_connector:
                self.runner.close_plugins()  # a KV connector's server socket and threads (engine/kv_transfer/remote.py)
        if self.group is not None:
            from moelink.comm.process_group import destroy

            destroy()
            self.group = None


    def close_runner(self) -> None:
        """End this rank's engine for good: its step stream stopped, its plug-ins closed (a KV connector's server
        socket and threads: engine/kv_transfer/remote.py), its runner dropped. The in-process executor's shutdown
        and the multiprocess rank's stop (engine/cluster/mp_rank.py). Idempotent."""
        runner = self.runner
        if runner is None:
            return
        runner.stream.shutdown()
        runner.close_plugins()
        self.release_runner()

    def release_runner(self) -> None:
        """Drop this rank's engine state (model, KV cache, graphs, streams; an expert move under way) so its memory
        can go back: the in-process executor's shutdown and `park`. The caller has stopped the step stream."""
        self.runner = self._mover = None
        self._launched.clear()

    # -- reuse (engine/cluster/rank_pool.py) -----------------------------------------------------------------
    def park(self) -> int:
        """Release this engine from the process and keep the process for the next engine: leave the group, close
        the KV connector, drop the runner (model, KV cache, streams), unfreeze and collect the heap when the engine's
        state outlived the release or at one park in gc_policy.PARK_FULL_COLLECTION_EVERY (the freeze at start-up
        kept the engine's objects from cycle collection), give the device's cached memory back. Returns the process id
        (the parked process the next `reinit` finds)."""
        self.shutdown()
        if self.runner is not None:  # a stream with a thread (tests' ThreadStream): else one idle thread more per engine
            self.runner.stream.shutdown()
        state = engine_state_refs(self.runner)
        self.release_runner()
        self.tp = None
        own = self._own_process()
        # The old engine's state gone by reference counting (the usual case): the heap may stay frozen, its few
        # cyclic leftovers with it, bounded (engine/contract/gc_policy.py park_keeps_heap_frozen).
        if not (own and park_keeps_heap_frozen(all(r() is None for r in state))):
            gc.unfreeze()  # this process's own start-up freeze (_freeze_if_own_process): the old engine is collectable
            gc.collect()
            if own:
                # Frozen again at once (what survives is the process's own: imports, Ray's state), so the next
                # engine's freeze walks only what it built: one full collection per reuse instead of two.
                gc.freeze()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return os.getpid()

    def reinit(self, config: WorkerConfig, rank: int, plan: ExpertParallelPlan,
               step_features: Sequence[StepFeature] = ()) -> int:
        """A parked process taken by a new engine: this rank of `config` from now on, exactly as a new actor's
        constructor would have made it (the caller then runs init_distributed and load). Returns the process id."""
        self.__init__(config, rank, plan, step_features)  # type: ignore[misc]  # re-run the constructor on purpose
        return os.getpid()


def engine_state_refs(runner) -> list[weakref.ref]:
    """Weak references to what holds an engine's memory in a rank (its runner, model and KV cache tensors): all dead
    once it is released means it went by reference counting, nothing of it waits for the cycle collector."""
    if runner is None:
        return []
    caches = getattr(runner, "kv_caches", None) or []
    tensors = [t for c in caches for t in (c if isinstance(c, (list, tuple)) else (c,)) if isinstance(t, torch.Tensor)]
    held = [runner, getattr(runner, "model", None), *tensors]
    return [weakref.ref(o) for o in held if o is not None]


def _same_plan(a: ExpertParallelPlan, b: ExpertParallelPlan) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a field without a value comparison (tensors): not provably the same, load afresh
        return False


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())
