"""The worker's model runner: keeps per-request state, builds one flat batch per step, runs the model, samples.

It knows no feature: speculative decoding, LoRA, images, structured output, prompt logprobs, routed experts, routing
replay and KV transfer join the step as plug-ins (engine/contract/step_plugin.py), made for the rank by the features
the cluster hands it (engine/cluster/step_features.py); one not configured is not in the list and costs no step
anything.

Legend: T scheduled tokens in the flat batch, S sequences, M max blocks per
sequence, D hidden, V vocab, R rows that sample this step.
"""
from __future__ import annotations

import contextlib

import logging
import os
import time
from typing import Callable, Sequence
from collections import deque

import numpy as np
import torch

from moelink.kernels.ops import select_kernels
from moelink.kernels.step_memo import STEP_MEMO
from moelink.scheduler.outputs import ModelRunnerOutput, SchedulerOutput

from ..config import kv_sizing
from ..config.model import ModelConfig
from ..contract.ep_step import LOW_LATENCY, EPStepPlan
from ..contract.kv_blocks import PagedKVBlocks
from ..contract.sampling_params import SamplingParams
from ..contract.spec_decoding import DraftRollback, VerifyStep
from ..contract.step_plugin import (DeviceInputs, DeviceStep, RankModel, SampledRows, SamplingContext, StepBatch,
                                    StepPlugin, StepWork)
from ..models.layers import ForwardContext
from ..tp.attention import tp_local_config
from ..tp.group import TensorParallel
from .cuda_graph import CudaGraphCapture, DecodeGraphs
from .graph_policy import bound_host_lengths, graph_sizes_to_capture, verify_graph_len, verify_sizes
from ..contract.host_copy import to_device, to_host
from .device_stream import make_stream
from .kv_cache import make_kv_caches
from .loader import load_model
from .input_batch import CachedRequestState, PersistentBatch, SlidingTable  # noqa: F401  (re-exported)
from .sampler import Sampler, SamplingMetadata
from ..state.cache import StateCaches, StatePlan
from .plugin_set import PluginSet
from .step_handle import DeviceResult, StepHandle
from .step_inputs import StepInputs, build_step_inputs, device_inputs
from .step_plan import SingleBatch, TwoBatchOverlap
from .weight_memory import describe_memory, weight_bytes_by_format

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model, the KV cache tensors and the request states of one rank."""

    def __init__(self, model_cfg: ModelConfig, block_size: int, num_kv_blocks: int | None, device: torch.device,
                 kernels: str = "auto", ep=None, load_progress: bool = False, cuda_graph_sizes: tuple[int, ...] = (),
                 graph_backend=None, step_plan: SingleBatch | TwoBatchOverlap | None = None, stream=None,
                 load_format: str = "auto", num_state_slots: int = 0,
                 num_state_checkpoints: int = 0, tp: TensorParallel | None = None,
                 plugins: Callable[[RankModel], Sequence[StepPlugin]] | None = None):
        """`num_kv_blocks` None: the cache is sized later, from the memory left once the
        weights are loaded (`available_kv_blocks`, then `allocate_kv_cache`).

        `cuda_graph_sizes`: decode batch sizes to capture once the KV cache exists (empty: all
        eager). `graph_backend` replaces torch.cuda.CUDAGraph (tests: cuda_graph.EagerReplay).
        `step_plan`: how eager steps run the model (engine/rank/step_plan.py; default one batch).
        `stream`: where device work runs relative to the host (engine/rank/device_stream.py; default the
        serial loop).
        `load_format`: where the weights come from (engine/loader.open_checkpoint; "dummy": random).
        `num_state_slots`, `num_state_checkpoints`: the per-sequence state pools of a model with linear-attention
        layers (scheduler/hybrid_cache.py hands out the slots; engine/state/cache.py holds them).
        `plugins`: the rank's step plug-ins, made from the loaded model (engine/rank/step_features.py's
        `step_plugins`, handed over by the worker); None: none (a bare runner: no speculative decoding, LoRA, images,
        structured output, prompt logprobs, routed experts, routing replay or KV connector)."""
        # Under TP (`tp`, engine/tp/group.py) the rank's view: its attention heads, so its KV cache holds
        # only its heads' K/V (engine/tp/attention.py); the model is built from the whole config + tp.
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.cfg = tp_local_config(model_cfg, tp.size) if self.tp is not None else model_cfg
        self.device = device
        self.step_plan = step_plan if step_plan is not None else SingleBatch()
        self.block_size = block_size
        self.kernels = select_kernels(device, kernels)
        self.model = load_model(model_cfg, self.kernels, device, ep, progress=load_progress, load_format=load_format,
                                tp=self.tp)
        self.kv_caches: list[tuple[torch.Tensor, ...]] = []
        if model_cfg.state_layers and num_state_slots < 1:
            raise ValueError(f"num_state_slots={num_state_slots} is invalid for {model_cfg.architecture}: its "
                             "layers with per-sequence state need one state slot per running sequence.")
        self.num_state_slots, self.num_state_checkpoints = num_state_slots, num_state_checkpoints
        self.state_caches: StateCaches | None = None
        self._state_copies: list[tuple[int, int]] = []  # (slot, checkpoint) a prefix hit starts from, next step
        # (full, sliding) layer pairs sharing cache tensors, with the sliding group's own block table; None: one
        # table and one tensor set per layer (ModelConfig.kv_layer_pairs).
        self.kv_pairs = model_cfg.kv_layer_pairs()
        self.sliding_window = model_cfg.attention.sliding_window if self.kv_pairs is not None else None
        self.null_block = -1
        self.ep = ep
        # The step's plug-ins, made before warm-up, the KV cache and graph capture (they may hook the model, give
        # the graphs an input, or bind the cache: engine/contract/step_plugin.py).
        # (A draft layer among them is loaded here too: its weights count and it keeps a cache layer.)
        self.step_plugins = PluginSet(plugins(RankModel(self.cfg, self.model, self.kernels, device, ep,
                                            self.tp.size if self.tp is not None else 1, load_format,
                                            model_cfg=model_cfg, block_size=block_size, tp=self.tp))
                                      if plugins is not None else ())
        self.plugins = self.step_plugins.plugins
        self.graph_sizes = self._graph_sizes(cuda_graph_sizes, ep, graph_backend)
        no_graphs = [p.name for p in self.plugins if not p.allows_graphs]
        if no_graphs and self.graph_sizes:
            logger.info("CUDA graphs off: a decode graph cannot run the steps of %s (docs/multimodal.md).",
                        ", ".join(no_graphs))
            self.graph_sizes = ()
        self.graph_backend = graph_backend
        self.graphs: DecodeGraphs | None = None
        if num_kv_blocks is not None:
            self.allocate_kv_cache(num_kv_blocks)
        self.sampler = Sampler()
        self.stream = stream if stream is not None else make_stream(device)
        self._in_flight: deque[StepHandle] = deque()  # launched, maybe not finished on the device
        self.eos_token_ids = set(model_cfg.eos_token_ids)
        self.requests: dict[str, CachedRequestState] = {}
        # Every held request's row: block table, sampling parameters, penalty counts (engine/rank/input_batch.py).
        self.batch = PersistentBatch(model_cfg.vocab_size, device)
        # Preempted requests keep their generator so a seeded request draws the
        # same tokens whether or not it was preempted.
        self._parked_generators: dict[str, torch.Generator | None] = {}

    # -- step plug-ins (engine/contract/step_plugin.py) ---------------------------------
    def plugin(self, name: str) -> StepPlugin | None:
        """The rank's plug-in of feature `name` (e.g. "lora", "images", "kv_transfer"); None: not configured."""
        return self.step_plugins.get(name)

    def close_plugins(self) -> None:
        """Release what the plug-ins hold (a KV connector's server socket and threads): the rank shuts down."""
        self.step_plugins.close()

    # -- KV cache -------------------------------------------------------------------
    def available_kv_blocks(self, memory_utilization: float) -> int:
        """KV blocks that fit in this rank's device now, weights loaded, keeping the device
        at most `memory_utilization` full (one block is kept back for the null block). Measured here,
        sized by `kv_sizing`."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = kv_sizing.gpu_kv_budget_bytes(total, free, memory_utilization)
        else:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = kv_sizing.cpu_kv_budget_bytes(avail, memory_utilization)
        draft = sum(p.kv_bytes_per_token() for p in self.plugins)  # a draft layer's cache
        budget -= kv_sizing.state_pool_bytes(self.cfg, self.num_state_slots, self.num_state_checkpoints)
        return kv_sizing.blocks_in_budget(budget, kv_sizing.kv_cache_bytes_per_block(self.cfg, self.block_size, draft))

    def allocate_kv_cache(self, num_kv_blocks: int) -> None:
        if num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks={num_kv_blocks} is invalid: the KV cache needs at least one block.")
        # Graphs captured on an older cache would replay into it: drop them (and the old cache) first.
        self.graphs = None
        self.kv_caches = []
        # One extra, never-allocated block at the end: the attention null block.
        self.null_block = num_kv_blocks
        self.kv_caches, kv_bytes = make_kv_caches(self.cfg, self.kv_pairs, num_kv_blocks, self.block_size, self.device)
        if self.cfg.state_layers:  # their entries of kv_caches: paged tensors (if any), then their state pools
            stateful = set(self.cfg.state_layers)
            self.state_caches = StateCaches(  # state_layers: linear attention's and DeepSeek-V4's (attention_for's
                # annotation names the paged kinds only)
                [self.cfg.attention_for(i) if i in stateful else None  # type: ignore[misc]
                 for i in range(self.cfg.num_layers)],
                self.num_state_slots, self.num_state_checkpoints, self.cfg.dtype, self.device)
            for i in stateful:  # linear attention has no paged tensors (gated_deltanet.py); DeepSeek-V4 has both
                self.kv_caches[i] = tuple(self.kv_caches[i]) + self.state_caches.layers[i]
            kv_bytes += self.state_caches.nbytes
        kv_bytes += sum(p.allocate_cache(num_kv_blocks) for p in self.plugins)  # a draft layer's, same block ids
        extra = [w for p in self.plugins if (w := p.weights()) is not None]
        weights = torch.nn.ModuleList([self.model, *extra]) if extra else self.model
        logger.info("rank memory: %s", describe_memory(weight_bytes_by_format(weights), num_kv_blocks,
                                                       self.block_size, kv_bytes))
        for p in self.plugins:  # e.g. a KV connector binds the cache (NIXL registers it now, at start)
            p.cache_allocated(lambda: PagedKVBlocks(self.kv_caches, self.kv_pairs, self.block_size, self.state_caches))
        if self.graph_sizes:
            self._capture_graphs()

    # -- CUDA graphs (engine/rank/cuda_graph.py) ---------------------------------------
    def _graph_sizes(self, sizes: tuple[int, ...], ep, backend) -> tuple[int, ...]:
        return graph_sizes_to_capture(sizes, self.kernels, ep, isinstance(self.step_plan, TwoBatchOverlap),
                                      backend, self.device, self.cfg.quantization is not None, logger, cfg=self.cfg,
                                      tp_size=self.tp.size if self.tp is not None else 1)

    def _capture_graphs(self) -> None:
        backend = self.graph_backend or CudaGraphCapture(self.device)
        if self.ep is not None:
            # Every rank captures the same sizes at the same time (allocate_kv_cache is a collective of the
            # executor), each forward in the low-latency mode, so their dispatches pair up.
            self.ep.all_to_all.begin_step(EPStepPlan(LOW_LATENCY, max(self.graph_sizes)))
        max_blocks = -(-self.cfg.max_model_len // self.block_size)
        query_len = max((p.graph_query_len() for p in self.plugins), default=1)  # speculative decoding's 1 + k
        verify_len = verify_graph_len(self.cfg, query_len - 1, self.block_size, logger)
        if self.state_caches is not None and verify_len > 1:
            logger.info("verify graphs off: a verify step of %s splits its batch and replays the accepted tokens "
                        "into the linear-attention states (eager); decode steps replay graphs.", self.cfg.architecture)
            verify_len = 1
        graphs = DecodeGraphs(self.model, self.kv_caches, self.graph_sizes, max_blocks, self.null_block, self.device,
                              backend, sliding_table=self.kv_pairs is not None,
                              verify_len=verify_len, max_context=self.cfg.max_model_len,
                              verify_batch_sizes=verify_sizes(self.graph_sizes, verify_len, self.ep, logger),
                              state_slots=self.state_caches is not None,
                              bound_host_lengths=bound_host_lengths(self.kernels),
                              token_input=self.step_plugins.graph_input)
        t0 = time.perf_counter()
        # Inside the backend's step context, as every eager step runs: the kernels a graph captures are those its
        # mode picks (batch-invariant mode's fixed-tile matmuls, not the library's).
        context = getattr(self.kernels, "step_context", None)
        with context() if context is not None else contextlib.nullcontext():
            graphs.capture_all()  # sizes that fail are dropped (and logged): serving goes on eagerly there
        if graphs.steps:
            self.graphs = graphs
            logger.info("decode graphs ready in %.1f s", time.perf_counter() - t0)

    # -- state updates --------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        if so.resync is not None:
            self._resync(so.resync)
        for rid in so.finished_req_ids:
            st = self.requests.pop(rid, None)
            if st is not None:
                self.batch.remove(st)
            self._parked_generators.pop(rid, None)
            self.step_plugins.release(rid, False)
        for rid in so.preempted_req_ids:
            st = self.requests.pop(rid, None)
            if st is not None:
                self.batch.remove(st)
                self._parked_generators[rid] = st.generator
            self.step_plugins.release(rid, True)  # resent whole when it resumes
        for new in so.scheduled_new_reqs:
            if new.req_id in self._parked_generators:
                gen = self._parked_generators.pop(new.req_id)
            else:
                gen = self._make_generator(new.sampling_params)
            self._add_request(new, gen)
        for cached in so.scheduled_cached_reqs:
            if cached.new_block_ids:
                self.requests[cached.req_id].add_blocks(cached.new_block_ids)
            if cached.new_sliding_block_ids:
                self.requests[cached.req_id].sliding.add(cached.new_sliding_block_ids)

    def _add_request(self, new, gen: torch.Generator | None) -> None:
        st = self.requests[new.req_id] = CachedRequestState(
            new.req_id, list(new.prompt_token_ids), list(new.output_token_ids), new.sampling_params,
            list(new.block_ids), new.num_computed_tokens, gen,
        )
        self.step_plugins.admit(new, st)  # the engine refused what no configured feature answers (LoRA, images)
        if self.kv_pairs is not None:
            st.sliding = SlidingTable(new.sliding_block_ids, self.null_block)
        if self.state_caches is not None:
            st.state_slot = new.state_slot
            if new.state_copy_from >= 0:  # a prefix hit: the slot starts as the checkpoint's copy
                self._state_copies.append((new.state_slot, new.state_copy_from))
        self.batch.add(st)

    def _resync(self, rs) -> None:
        """Elastic EP (scheduler.Scheduler.rewind): hold exactly the scheduler's requests, as it holds them. A
        request keeps its generator (a seeded one may have drawn once in the broken step)."""
        gens = {**self._parked_generators, **{rid: st.generator for rid, st in self.requests.items()}}
        self.step_plugins.reset()  # hold none (a KV connector: the rewind counted its transfers in flight failed)
        self.requests = {}
        self.batch.clear()
        self._parked_generators = {rid: gens[rid] for rid in rs.waiting_ids if rid in gens}
        for new in rs.running:
            self._add_request(new, gens[new.req_id] if new.req_id in gens else
                              self._make_generator(new.sampling_params))

    def _make_generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(params.seed)
        return gen

    # -- one step ---------------------------------------------------------------
    def execute_model(self, so: SchedulerOutput, run_forward: bool = True) -> ModelRunnerOutput:
        """Run one step and wait for it (the serial loop). With no tokens of its own, a rank still runs the MoE
        layers' collectives when `run_forward` says a peer has tokens (expert parallelism)."""
        return self.launch(so, run_forward).collect()

    def quiesce(self, timeout_s: float) -> None:
        """Let the device work of every launched step end (errors dropped: elastic EP, the steps a lost rank
        broke fail in their collectives), so nothing of an old process group runs once a new one forms. Bounded:
        work still running after `timeout_s` is logged and left."""
        deadline = time.monotonic() + timeout_s
        while self._in_flight:
            handle = self._in_flight.popleft()
            if handle.work is None:
                continue
            try:
                handle.work.wait(max(deadline - time.monotonic(), 0.0))
            except Exception as exc:  # noqa: BLE001  (a broken step's error: the engine already handled the loss)
                logger.info("step %d's device work ended with %s (dropped)", handle.step_id, type(exc).__name__)

    def launch(self, so: SchedulerOutput, run_forward: bool = True) -> StepHandle:
        """Do the step's host work and submit its device work to the stream; returns without waiting for the
        device (engine/rank/step_handle.py). Steps are collected in launch order."""
        t0 = time.perf_counter()
        while len(self._in_flight) >= 2:  # at most two: pinned staging is double-buffered (cuda_graph.py)
            self._in_flight.popleft().wait_device()
        for p in self.step_plugins.before_step:
            p.before_step(so)
        self._update_states(so)
        if so.total_num_scheduled_tokens == 0:
            return self._launch_idle(so, run_forward, t0)
        num_scheduled = so.num_scheduled_tokens
        states = [self.requests[r] for r in num_scheduled]
        query_lens = list(num_scheduled.values())
        state_plan = self._plan_states(so, states, query_lens)
        rows_S = self.batch.rows_of(states)
        spec = so.scheduled_spec_tokens
        inp = build_step_inputs(states, query_lens, self.block_size, self.sliding_window, self.null_block,
                                tables_SM=self.batch.tables(rows_S),
                                spec_tokens=[spec.get(st.req_id) for st in states] if spec else None)
        # The plug-ins plan before the computed counts move on (their rows are read by position).
        works = self._plan_works(StepBatch(so, states, query_lens, inp.qsl_S1, inp.num_tokens))
        for st, n in zip(states, query_lens):
            st.num_computed_tokens += n
        picked = [states[s] for s in inp.sample_rows]
        rows = SampledRows(inp, states, picked, spec)
        for w in works:  # e.g. a device drafter plans its drafts of the sampling rows
            w.plan_rows(rows)
        handle = StepHandle(so.step_id, picked, inp.num_tokens, len(states), 0.0, self.step_plugins.collectors, spec)
        handle.works = works
        masks = next((w.token_masks for w in works if w.token_masks), None)
        meta = self._sampling(handle, SamplingContext(self.batch, rows_S, inp.sample_rows, inp.qsl_S1, picked, spec,
                                                      self.eos_token_ids, self.device, masks, inp.num_pending),
                              picked, works)
        # A graph replays a step whose plug-ins it can carry (LoRA's linears, and its experts with the Triton
        # path: LoRAStepPlan.graphable; never given routing or image rows).
        graph_batch = (self._graph_batch(so, query_lens, inp.seq_lens)
                       if all(w.graphable for w in works) else None)
        staged = None
        if graph_batch is not None:
            tokens = [w.graph_tokens_T for w in works if w.graph_tokens_T is not None]
            staged = self.graphs.stage(inp.tokens_T, inp.positions_T, inp.slots_T, inp.seq_lens, inp.tables_SM,
                                       inp.sliding, batch=graph_batch,
                                       state_slots=state_plan.slots if state_plan is not None else None,
                                       query_lens=query_lens, token_values=tokens[0] if tokens else None)
        handle.host_s = time.perf_counter() - t0
        ep_step, ops = so.ep_step, self.batch.take_device_ops()  # batch-state fills the device work applies first
        handle.work = self.stream.submit(self._in_step_context(
            lambda: self._device_step(handle, inp, meta, staged, ep_step, ops, state_plan, works)))
        self._in_flight.append(handle)
        return handle

    def _launch_idle(self, so: SchedulerOutput, run_forward: bool, t0: float) -> StepHandle:
        """A step with no tokens of this rank's own. Under EP it still runs the MoE layers' collectives when
        `run_forward` says a peer has tokens; its plug-ins' idle work (LoRA's slot writes, KV transfers) runs too."""
        handle = StepHandle(so.step_id, [], 0, 0, 0.0, self.step_plugins.collectors)
        ops = self.batch.take_device_ops()
        runs = run_forward or bool(ops)
        works = self.step_plugins.plan_idle(so, runs)
        if runs or works:
            # Under graphs too: a low-latency dispatch moves R blocks of the decode capacity whatever T is,
            # so this eager pass makes the same collective calls as its peers' replays.
            handle.host_s = time.perf_counter() - t0
            handle.works = works
            ep_step = so.ep_step
            handle.work = self.stream.submit(self._in_step_context(
                lambda: self._device_moe_only(ep_step, ops, run_forward, works)))
            self._in_flight.append(handle)
        return handle

    def _plan_works(self, batch: StepBatch) -> list[StepWork]:
        return self.step_plugins.plan(batch)

    def _plan_states(self, so: SchedulerOutput, states: list[CachedRequestState], query_lens: list[int]
                     ) -> StatePlan | None:
        """Per-sequence state: each sequence's slot and whether it continues a state (read before the step moves
        num_computed_tokens on); the copies this step owes (prefix hits before the forward, saves after it)."""
        if self.state_caches is None:
            return None
        saves = so.state_saves
        plan = StatePlan([st.state_slot for st in states], [st.num_computed_tokens > 0 for st in states],
                         query_lens, self._state_copies,
                         [(ck, self.requests[rid].state_slot) for rid, ck in saves.items()],
                         [bool(so.scheduled_spec_tokens.get(st.req_id)) for st in states]
                         if so.scheduled_spec_tokens else None)
        self._state_copies = []
        return plan

    def _sampling(self, handle: StepHandle, ctx: SamplingContext, picked: list[CachedRequestState],
                  works: list[StepWork]) -> SamplingMetadata | VerifyStep | None:
        """How the step's sampling rows sample: a plug-in's sampling that takes them over (speculative decoding's
        verify step: engine/spec/verify.py), the sampler's metadata, or None (no row samples), each row within its
        allowed tokens where a plug-in gives them (`ctx.token_masks`: structured output). Each picked row's next
        token is then read on the device."""
        masks = ctx.token_masks
        if not picked:
            return None
        meta: SamplingMetadata | VerifyStep | None = next(
            (m for w in works if (m := w.sampling(ctx)) is not None), None)
        if meta is None:
            if ctx.spec_tokens:
                raise RuntimeError(f"step {handle.step_id} verifies drafts, but this rank runs no speculative "
                                   "decoding: give the engine's speculative config to every rank.")
            meta = SamplingMetadata.from_batch(
                self.batch, ctx.rows_S[ctx.sample_rows], picked, self.eos_token_ids, self.device,
                [masks.get(st.req_id) for st in picked] if masks else None, ctx.num_pending)
        for r, st in enumerate(picked):
            st.pending = (handle, r)  # the next step reads this token on the device
        return meta

    def _in_step_context(self, fn: Callable[[], DeviceResult]) -> Callable[[], DeviceResult]:
        """fn inside the kernel backend's step context where it has one (batch-invariant mode's matmul tiles:
        kernels/batch_invariant.py), entered on the thread that runs it (torch's function modes are per thread)."""
        context = getattr(self.kernels, "step_context", None)
        if context is None:
            return fn

        def run() -> DeviceResult:
            with context():
                return fn()
        return run

    def _device_step(self, handle: StepHandle, inp: StepInputs, meta: SamplingMetadata | VerifyStep | None, staged,
                     ep_step, ops: list, state_plan: StatePlan | None, works: list[StepWork]) -> DeviceResult:
        """The step's device work, in stream order: batch-state fills, the plug-ins' work before the forward (KV
        loads, adapter slots, given routing), inputs in (tokens still on the device from the steps before it),
        forward, the plug-ins' work on its hidden states, sampling, the device drafter's drafts, the plug-ins' last
        work (KV saves), results out to host memory. Waits for nothing on the host side."""
        t0 = time.perf_counter()
        STEP_MEMO.clear()  # the plain-torch kernels' per-step memos start empty (kernels/step_memo.py)
        dev = self.device
        step = DeviceStep(self.model, dev, replay=staged is not None)
        with torch.inference_mode():
            self.batch.apply_device_ops(ops)
            for w in works:
                w.before_forward(step)
            if self.ep is not None:
                self.ep.all_to_all.begin_step(ep_step)  # the step's dispatch mode (engine/contract/ep_step.py)
            pending_P = self._pending_tokens(inp)
            eager_inputs = staged is None or any(w.needs_inputs for w in works)  # a drafter reads them after a replay
            x = device_inputs(inp, pending_P, dev, self.null_block) if eager_inputs else None
            if x is not None:
                step.inputs = DeviceInputs(x.input_ids_T, x.positions_T, x.attn)
            state = None
            if state_plan is not None:
                copies = state_plan.copies_in  # prefix hits: before the forward
                self.state_caches.copy([d for d, _ in copies], [c for _, c in copies])
                self.state_caches.zero(state_plan.fresh_decodes)  # one-token first chunks (StatePlan.fresh_decodes)
                if staged is None:  # a replayed graph reads its own static slots (cuda_graph.DecodeGraphs.stage)
                    state = state_plan.state_step(x.attn.query_start_loc_S1, inp.pure_decode, dev)
            if staged is not None:
                h_TD = self.graphs.replay(staged, pending_P)
            else:
                extras = {k: v for w in works for k, v in w.forward_extras().items()}
                h_TD = self.step_plan.forward(self.model, x.input_ids_T, x.positions_T,
                                              ForwardContext(x.attn, self.kv_caches, x.attn_sliding, state=state,
                                                             **extras))
            if state_plan is not None:  # checkpoints of the states this step ended at a block boundary: after
                self.state_caches.copy([ck for ck, _ in state_plan.saves], [slot for _, slot in state_plan.saves])
            # The plug-ins' work on the hidden states comes before sampling (which may not run: a prompt's chunk).
            res = DeviceResult(read_moe=self._take_moe(), payloads=[w.after_forward(step, h_TD) for w in works])
            if meta is not None and not isinstance(meta, SamplingMetadata):  # a verify step
                res.spec = meta.run(self.model, h_TD, self.tp)  # TP: the group's first rank's tokens
                handle.sampled_R = res.spec.sampled_R
                step.emitted_R = res.spec.emitted_R
                if state is not None and state.split is not None:
                    # The verifying sequences' states take only their accepted tokens (the last known one and the
                    # accepted drafts: what each emits), on the device: no sync.
                    rollback: DraftRollback = self.model
                    rollback.replay_states(res.spec.emitted_R)
            elif meta is not None:
                self._sample(handle, inp, meta, h_TD, res)
            step.sampled_R = handle.sampled_R
            for i, w in enumerate(works):  # e.g. a device drafter drafts from the last accepted position
                drafted = w.after_sampling(step, h_TD)
                if drafted is not None:
                    res.payloads[i] = drafted
            for w in reversed(works):  # the last to start ends first: KV saves after the others' work
                w.after_step(step)
        res.device_s = time.perf_counter() - t0
        return res

    def _device_moe_only(self, ep_step, ops: list, run_forward: bool, works: list[StepWork]) -> DeviceResult:
        t0 = time.perf_counter()
        STEP_MEMO.clear()
        step = DeviceStep(self.model, self.device, replay=False, run_forward=run_forward, idle=True)
        with torch.inference_mode():
            self.batch.apply_device_ops(ops)
            for w in works:
                w.before_forward(step)
            res = DeviceResult(payloads=[None] * len(works))
            if run_forward:
                if self.ep is not None:
                    self.ep.all_to_all.begin_step(ep_step)
                self.step_plan.forward_moe_only(self.model)
                res.read_moe = self._take_moe()
            for w in reversed(works):  # a draft layer's collectives, as its peers run them; KV saves last
                w.after_step(step)
        res.device_s = time.perf_counter() - t0
        return res

    def _pending_tokens(self, inp: StepInputs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat indices [P], token ids [P]) of the batch's tokens that earlier steps sampled on the device."""
        if inp.pending_dst_P is None:
            return None
        dev = self.device
        src = [h.sampled_R.index_select(0, to_device(rows, torch.long, dev)) for h, rows in inp.pending_src]
        return to_device(inp.pending_dst_P, torch.long, dev), src[0] if len(src) == 1 else torch.cat(src)

    def _graph_batch(self, so: SchedulerOutput, query_lens: list[int], seq_lens: list[int]) -> int | None:
        """The captured size this step replays, or None (eager). Under EP the driver chose it for every rank
        (the largest decode batch over ranks, `EPStepPlan.graph_batch`), so all ranks replay one size."""
        if self.graphs is None:
            return None
        num_seqs = len(query_lens)
        if max(query_lens) > 1:  # a verify graph: rows of 1 to 1 + k tokens (engine/rank/cuda_graph.py); under EP
            # only in a low-latency step, each rank its own size (engine/contract/ep_step.py says why that is sound)
            if not self.graphs.verify_fits(query_lens, seq_lens) or (self.ep is not None and not (
                    so.ep_step is not None and so.ep_step.mode == LOW_LATENCY)):
                return None
            return self.graphs.size_for(num_seqs, self.graphs.verify_len)
        if self.ep is None:
            return self.graphs.size_for(num_seqs)
        b = so.ep_step.graph_batch if so.ep_step is not None else None
        return b if b in self.graphs.steps and b >= num_seqs else None

    def _take_moe(self):
        take = self.model.moe_stats.take()
        mode = None
        if self.ep is not None:
            m = self.ep.all_to_all.mode  # a TwoModeAllToAll's current mode; None on a single-mode backend
            mode = m.name if m is not None else "exact"

        def read():
            snap = take()
            if mode is not None:
                snap.ep_mode = mode
            return snap
        return read

    def _sample(self, handle: StepHandle, inp: StepInputs, meta: SamplingMetadata, h_TD, res: DeviceResult) -> None:
        dev = self.device
        last_R = to_device(inp.qsl_S1[1:][inp.sample_rows] - 1, torch.long, dev)
        logits_RV = self.model.compute_logits(h_TD.index_select(0, last_R))
        # Penalties read their counts on the device (input_batch.PenaltyCounts): the outputs still in flight
        # are in them already, and this step's are counted right after it samples.
        result = self.sampler(logits_RV, meta)
        if self.tp is not None:
            # One token per sequence for the whole TP group: the logits are the same on every rank (gathered), but
            # an unseeded random draw is each rank's own; the group's first rank's tokens are everyone's (the next
            # step's inputs read them on the device).
            self.tp.broadcast_first(result.token_ids_B)
        meta.record_penalised(result.token_ids_B)
        handle.sampled_R = result.token_ids_B  # stays on the device: the next step's inputs read it there
        res.tokens_R = to_host(result.token_ids_B)
        if result.logprobs_packed_LX is not None:
            res.logprobs_LX = to_host(result.logprobs_packed_LX)
            res.num_logprobs, res.max_num_logprobs = result.num_logprobs, result.max_num_logprobs
