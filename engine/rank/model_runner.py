"""The worker's model runner: keeps per-request state, builds one flat batch per step, runs the model, samples.

Legend: T scheduled tokens in the flat batch, S sequences, M max blocks per
sequence, D hidden, V vocab, R rows that sample this step.
"""
from __future__ import annotations

import contextlib

import logging
import os
import time
from typing import Callable
from collections import deque

import numpy as np
import torch

from moelink.kernels.ops import select_kernels
from moelink.scheduler.outputs import ModelRunnerOutput, SchedulerOutput

from ..config import kv_sizing
from ..config.model import ModelConfig
from ..config.multimodal import MultimodalConfig
from ..config.speculative import SpeculativeConfig
from ..contract.ep_step import LOW_LATENCY, EPStepPlan
from ..contract.kv_blocks import PagedKVBlocks, WorkerKVConnector, start_transfers
from ..contract.sampling_params import SamplingParams
from ..contract.spec_decoding import DeviceDrafter, DraftRollback, HostDrafter, SpecDecoding, VerifyStep
from ..models.layers import ForwardContext, ImageSplice
from ..multimodal.rank_side import StepImages, make_image_runner
from ..tp.attention import tp_local_config
from ..tp.group import TensorParallel
from .cuda_graph import CudaGraphCapture, DecodeGraphs
from .graph_policy import bound_host_lengths, graph_sizes_to_capture, verify_graph_len, verify_sizes
from ..contract.host_copy import to_device, to_host
from .device_stream import make_stream
from .kv_cache import make_kv_caches
from .loader import load_model
from . import prompt_logprobs, routed_experts, routing_replay
from .input_batch import CachedRequestState, PersistentBatch, SlidingTable  # noqa: F401  (re-exported)
from .sampler import Sampler, SamplingMetadata
from ..state.cache import StateCaches, StatePlan
from .step_handle import DeviceResult, StepHandle
from .step_inputs import StepInputs, build_step_inputs, device_inputs
from .step_plan import SingleBatch, TwoBatchOverlap
from .weight_memory import describe_memory, weight_bytes_by_format
from .lora_targets import LoRASlots, LoRAStepPlan, begin_lora_step, lora_slots, plan_lora_step

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model, the KV cache tensors and the request states of one rank."""

    def __init__(self, model_cfg: ModelConfig, block_size: int, num_kv_blocks: int | None, device: torch.device,
                 kernels: str = "auto", ep=None, load_progress: bool = False, cuda_graph_sizes: tuple[int, ...] = (),
                 graph_backend=None, step_plan: SingleBatch | TwoBatchOverlap | None = None, stream=None,
                 load_format: str = "auto", kv_connector: WorkerKVConnector | None = None,
                 speculative: SpeculativeConfig | None = None, num_state_slots: int = 0,
                 num_state_checkpoints: int = 0, tp: TensorParallel | None = None,
                 spec_decoding: SpecDecoding | None = None, multimodal: MultimodalConfig | None = None):
        """`num_kv_blocks` None: the cache is sized later, from the memory left once the
        weights are loaded (`available_kv_blocks`, then `allocate_kv_cache`).

        `cuda_graph_sizes`: decode batch sizes to capture once the KV cache exists (empty: all
        eager). `graph_backend` replaces torch.cuda.CUDAGraph (tests: cuda_graph.EagerReplay).
        `step_plan`: how eager steps run the model (engine/rank/step_plan.py; default one batch).
        `stream`: where device work runs relative to the host (engine/rank/device_stream.py; default the
        serial loop).
        `load_format`: where the weights come from (engine/loader.open_checkpoint; "dummy": random).
        `kv_connector`: the worker half of a KV connector (engine/contract/kv_blocks.py), which runs the KV loads
        and saves a step plans (`SchedulerOutput.kv_transfers`); None: no connector.
        `speculative`: a SpeculativeConfig (engine/config/speculative.py): its drafter proposes after each step;
        `spec_decoding`: the feature that runs it (engine/spec/api.SPEC_DECODING, behind
        engine/contract/spec_decoding.py's protocols), required with `speculative`.
        `num_state_slots`, `num_state_checkpoints`: the per-sequence state pools of a model with linear-attention
        layers (scheduler/hybrid_cache.py hands out the slots; engine/state/cache.py holds them).
        `multimodal`: a multimodal checkpoint's images (engine/multimodal/): its vision tower is loaded when they are
        on (MultimodalConfig.limit_mm_per_prompt)."""
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
        self.kv_connector = kv_connector
        self.kv_blocks: PagedKVBlocks | None = None  # the cache as the connector copies it (set with the cache)
        self.ep = ep
        # Speculative decoding's drafter: a host one, or a draft layer (MTP, EAGLE-3) drafting in the device work
        # (built here, before the KV cache: its weights count and it keeps a cache layer); None: off.
        # Under TP every rank of the group builds it with the group (its layers split as the main ones:
        # engine/spec/proposer/).
        if speculative is not None and spec_decoding is None:
            raise ValueError("ModelRunner(speculative=...) needs spec_decoding: the feature that runs it "
                             "(moelink.engine.spec.api.SPEC_DECODING).")
        self.spec_decoding = spec_decoding if speculative is not None else None
        self.device_drafter: DeviceDrafter | None = None
        self.drafter: HostDrafter | DeviceDrafter | None = None
        if self.spec_decoding is not None:
            self.device_drafter = self.spec_decoding.device_drafter(speculative, model_cfg, self.model, self.kernels,
                                                                    device, ep, block_size, load_format, tp=self.tp)
            self.drafter = self.device_drafter or self.spec_decoding.host_drafter(speculative)
        self.graph_sizes = self._graph_sizes(cuda_graph_sizes, ep, graph_backend)
        # The requests' images (None: a text model, or images off): the vision tower, its cache, each step's rows.
        self.images = make_image_runner(model_cfg, multimodal, device, load_format)
        if self.images is not None and self.graph_sizes:
            # A decode step of an image request turns by its 3-D positions, which a captured forward does not take
            # (Qwen3.5; Kimi K2.5's 1-D decode steps carry nothing, but graphs with its images are untested on a GPU).
            logger.info("CUDA graphs off: a multimodal model's steps carry image rows (docs/multimodal.md).")
            self.graph_sizes = ()
        if self.graph_sizes and self.device_drafter is not None and self.device_drafter.aux_layers:
            # EAGLE-3, DeepSeek-V4's MTP (the hyper-connection streams)
            logger.info("CUDA graphs off: the drafter reads states that a captured forward does not keep.")
            self.graph_sizes = ()
        self.graph_backend = graph_backend
        # enable_lora: the adapters' slots and hooks. Before the cache: a cache given here captures the decode graphs,
        # which read it (2026-11-27's lease found every CUDA-graph engine failing on its absence).
        self.lora: LoRASlots | None = None
        self.graphs: DecodeGraphs | None = None
        # Before the cache: capturing graphs there sizes the verify graphs by it (cuda_graph.verify_graph_len).
        self.num_speculative_tokens = speculative.num_speculative_tokens if speculative is not None else 0
        if num_kv_blocks is not None:
            self.allocate_kv_cache(num_kv_blocks)
        self.sampler = Sampler()
        self.stream = stream if stream is not None else make_stream(device, False)
        self._in_flight: deque[StepHandle] = deque()  # launched, maybe not finished on the device
        self.eos_token_ids = set(model_cfg.eos_token_ids)
        self.requests: dict[str, CachedRequestState] = {}
        # The requests held that asked for prompt logprobs: a step plans their scoring only while there are some.
        self._prompt_lp_ids: set[str] = set()
        # Rollout routing replay (enable_routing_capture): the capture, and the requests held that asked.
        self.routing_capture = None
        self._routed_ids: set[str] = set()
        # Requests that give their prompt's routing (SamplingParams.forced_routed_experts, engine/rank/routing_replay.py).
        self._replay_ids: set[str] = set()
        # Every held request's row: block table, sampling parameters, penalty counts (engine/rank/input_batch.py).
        self.batch = PersistentBatch(model_cfg.vocab_size, device)
        # Preempted requests keep their generator so a seeded request draws the
        # same tokens whether or not it was preempted.
        self._parked_generators: dict[str, torch.Generator | None] = {}

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
        draft = self.device_drafter.kv_bytes_per_token() if self.device_drafter is not None else 0
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
        if self.device_drafter is not None:  # its draft layer's cache, on the same block ids (engine/spec/proposer/chain.py)
            kv_bytes += self.device_drafter.allocate(num_kv_blocks)
        weights = (self.model if self.device_drafter is None
                   else torch.nn.ModuleList([self.model, self.device_drafter.layer]))
        logger.info("rank memory: %s", describe_memory(weight_bytes_by_format(weights), num_kv_blocks,
                                                       self.block_size, kv_bytes))
        if self.kv_connector is not None:
            self.kv_blocks = PagedKVBlocks(self.kv_caches, self.kv_pairs, self.block_size, self.state_caches)
            allocated = getattr(self.kv_connector, "cache_allocated", None)  # e.g. NIXL registers it now, at start
            if allocated is not None:
                allocated(self.kv_blocks)
        if self.graph_sizes:
            self._capture_graphs()

    # -- CUDA graphs (engine/rank/cuda_graph.py) ---------------------------------------
    def enable_lora(self, limits) -> None:
        """Serve LoRA adapters (engine/lora/): hooks on the model's target linears and `limits.max_loras` device
        slots; before warm-up and graph capture (decode graphs read each replay's per-token slots from a static
        buffer: cuda_graph.DecodeGraphs)."""
        self.lora = lora_slots(self.model, limits, self.kernels, self.cfg.dtype, self.device, self.cfg.model)
        if self.graphs is not None:  # captured with the cache (num_kv_blocks given): again, with the slots' input
            self.graphs = None
            self._capture_graphs()

    def enable_routing_capture(self) -> None:
        """Record every step's routed experts (`--enable-return-routed-experts`, moe/routing_capture.py): before
        warm-up and graph capture, so that the largest step sizes the buffer and the graphs replay the copies."""
        self.routing_capture = self.model.enable_routing_capture()

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
        verify_len = verify_graph_len(self.cfg, self.num_speculative_tokens, self.block_size, logger)
        if self.state_caches is not None and verify_len > 1:
            logger.info("verify graphs off: a verify step of %s splits its batch and replays the accepted tokens "
                        "into the linear-attention states (eager); decode steps replay graphs.", self.cfg.architecture)
            verify_len = 1
        graphs = DecodeGraphs(self.model, self.kv_caches, self.graph_sizes, max_blocks, self.null_block, self.device,
                              backend, sliding_table=self.kv_pairs is not None,
                              verify_len=verify_len, max_context=self.cfg.max_model_len,
                              verify_batch_sizes=verify_sizes(self.graph_sizes, verify_len, self.ep, logger),
                              state_slots=self.state_caches is not None,
                              bound_host_lengths=bound_host_lengths(self.kernels), lora=self.lora)
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
            self._prompt_lp_ids.discard(rid)
            self._routed_ids.discard(rid)
            self._replay_ids.discard(rid)
            st = self.requests.pop(rid, None)
            if st is not None:
                self.batch.remove(st)
            self._parked_generators.pop(rid, None)
            if self.images is not None:
                self.images.drop(rid)
        for rid in so.preempted_req_ids:
            self._prompt_lp_ids.discard(rid)
            self._routed_ids.discard(rid)
            self._replay_ids.discard(rid)
            st = self.requests.pop(rid, None)
            if st is not None:
                self.batch.remove(st)
                self._parked_generators[rid] = st.generator
            if self.images is not None:  # resent whole when it resumes (its images from the encoder cache)
                self.images.drop(rid)
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
        if new.lora is not None:
            if self.lora is None:  # the engine refuses these without enable_lora; a rank cannot answer them
                raise ValueError(f"request {new.req_id!r} names LoRA adapter {new.lora.lora_name!r}, but this rank "
                                 "serves none: start the engine with enable_lora=True.")
            st.lora_slot = self.lora.slot_for(new.lora, {r.lora_slot for r in self.requests.values()} - {-1})
            st.lora_int_id = new.lora.lora_int_id
        if new.sampling_params.prompt_logprobs is not None:
            self._prompt_lp_ids.add(new.req_id)
        if new.sampling_params.return_routed_experts:
            if self.routing_capture is None:  # the engine refuses these without the flag; a rank cannot answer them
                raise ValueError(f"request {new.req_id!r} asks return_routed_experts, but this rank records no routing: "
                                 "start the engine with enable_return_routed_experts.")
            self._routed_ids.add(new.req_id)
        if new.sampling_params.forced_routed_experts is not None:
            self.model.routing_replay()  # made on first use (ValueError for a model that cannot replay)
            self._replay_ids.add(new.req_id)
        if new.multimodal is not None:
            if self.images is None:  # the engine processes images only for a model whose ranks load the tower
                raise ValueError(f"request {new.req_id!r} carries images, but this rank has no vision tower "
                                 "(a text model, or limit_mm_per_prompt image=0).")
            self.images.add(new.req_id, new.multimodal, new.prompt_token_ids)
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
        if self.kv_connector is not None:  # the rewind counted its transfers in flight failed
            self.kv_connector.drop_pending()
        self.requests = {}
        self._prompt_lp_ids = set()
        self._routed_ids = set()
        self._replay_ids = set()
        self.batch.clear()
        if self.images is not None:
            self.images.clear()
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
        if so.lora_prefetch and self.lora is not None:  # adapters the driver holds requests for: read them ahead
            self.lora.host.prefetch(so.lora_prefetch)
        if so.lora_table is not None and self.lora is not None:  # DP attention: the driver's table, every rank's
            self.lora.sync_table(so.lora_table)
        self._update_states(so)
        ep_step = so.ep_step
        ops = self.batch.take_device_ops()  # batch-state fills the step's device work applies first
        transfers = so.kv_transfers
        if transfers is not None and self.kv_connector is None:
            raise RuntimeError(f"step {so.step_id} plans KV transfers, but this rank has no KV connector: give the "
                               "engine's kv_connector to every rank (WorkerConfig.kv_connector).")
        if so.total_num_scheduled_tokens == 0:
            handle = StepHandle(so.step_id, [], 0, 0, 0.0, (self.kv_connector.poll if self.kv_connector is not None else None))
            if run_forward or ops or transfers is not None:
                # Under graphs too: a low-latency dispatch moves R blocks of the decode capacity whatever T is,
                # so this eager pass makes the same collective calls as its peers' replays.
                handle.host_s = time.perf_counter() - t0
                lora = self._lora_moe_only()
                handle.work = self.stream.submit(self._in_step_context(
                    lambda: self._device_moe_only(ep_step, ops, run_forward, transfers, lora)))
                self._in_flight.append(handle)
            return handle
        num_scheduled = so.num_scheduled_tokens
        states = [self.requests[r] for r in num_scheduled]
        query_lens = list(num_scheduled.values())
        # Per-sequence state: each sequence's slot and whether it continues a state (read before the step moves
        # num_computed_tokens on); the copies this step owes (prefix hits before the forward, saves after it).
        state_plan = None
        if self.state_caches is not None:
            saves = so.state_saves
            state_plan = StatePlan([st.state_slot for st in states], [st.num_computed_tokens > 0 for st in states],
                                   query_lens, self._state_copies,
                                   [(ck, self.requests[rid].state_slot) for rid, ck in saves.items()],
                                   [bool(so.scheduled_spec_tokens.get(st.req_id)) for st in states]
                                   if so.scheduled_spec_tokens else None)
            self._state_copies = []
        rows_S = self.batch.rows_of(states)
        spec = so.scheduled_spec_tokens
        inp = build_step_inputs(states, query_lens, self.block_size, self.sliding_window, self.null_block,
                                tables_SM=self.batch.tables(rows_S),
                                spec_tokens=[spec.get(st.req_id) for st in states] if spec else None)
        # A step holding image requests: their rows to splice and every token's 3-D positions (before the
        # computed counts move on: the rows are read by prompt position).
        images = self.images.plan([(st.req_id, st.num_computed_tokens, n) for st, n in zip(states, query_lens)]
                                  ) if self.images is not None and self.images.holds_images() else None
        prompt_lp = prompt_logprobs.plan(states, query_lens, inp.qsl_S1) if self._prompt_lp_ids else None
        routed = routed_experts.plan(states, query_lens, inp.qsl_S1) if self._routed_ids else None
        replay = (routing_replay.plan(states, query_lens, inp.qsl_S1, self.model.routing_replay().num_layers,
                                      self.model.cfg.top_k) if self._replay_ids else None)
        lora = None
        if self.lora is not None:  # the step's per-token slots and the slot writes owed, run in the device work
            table = so.lora_table is not None  # DP attention: each request's slot is its adapter's in the table
            lora = plan_lora_step(self.lora, [self.lora.slot_of(st.lora_int_id) if table else st.lora_slot
                                              for st in states], query_lens, self.ep is not None)
        for st, n in zip(states, query_lens):
            st.num_computed_tokens += n
        picked = [states[s] for s in inp.sample_rows]
        draft_plan = self.device_drafter.plan(inp, states, picked, spec) if self.device_drafter is not None else None
        handle = StepHandle(so.step_id, picked, inp.num_tokens, len(states), 0.0, (self.kv_connector.poll if self.kv_connector is not None else None), self.drafter,
                            spec, self.num_speculative_tokens, so.no_draft_req_ids,
                            self.spec_decoding.may_draft if self.spec_decoding is not None else None)
        meta: SamplingMetadata | VerifyStep | None = None
        if picked and spec:  # a verify step (speculative decoding: engine/spec/verify.py)
            assert self.spec_decoding is not None, "drafts to verify without speculative decoding"
            meta = self.spec_decoding.verify_step(self.batch, rows_S, inp.sample_rows, inp.qsl_S1, picked, spec,
                                                  self.eos_token_ids, self.device, so.grammar_bitmask,
                                                  inp.num_pending)
            for r, st in enumerate(picked):
                st.pending = (handle, r)
        elif picked:
            bitmasks = so.grammar_bitmask
            meta = SamplingMetadata.from_batch(
                self.batch, rows_S[inp.sample_rows], picked, self.eos_token_ids, self.device,
                [bitmasks.get(st.req_id) for st in picked] if bitmasks else None, inp.num_pending)
            for r, st in enumerate(picked):
                st.pending = (handle, r)  # the next step reads this token on the device
        # Given routing runs eagerly (a graph does not replay it; under EP with graphs the engine refuses it).
        # LoRA: a graph replays the linears' adapters, and the experts' with the Triton path (LoRAStepPlan.graphable).
        graph_batch = (self._graph_batch(so, query_lens, inp.seq_lens)
                       if replay is None and (lora is None or lora.graphable) else None)
        staged = None
        if graph_batch is not None:
            staged = self.graphs.stage(inp.tokens_T, inp.positions_T, inp.slots_T, inp.seq_lens, inp.tables_SM,
                                       inp.sliding, batch=graph_batch,
                                       state_slots=state_plan.slots if state_plan is not None else None,
                                       query_lens=query_lens, lora_slots=lora.slots_T if lora is not None else None)
        if images is not None:
            handle.encoder_counts = self.images.take_counts()
        handle.host_s = time.perf_counter() - t0
        handle.work = self.stream.submit(self._in_step_context(
            lambda: self._device_step(handle, inp, meta, staged, ep_step, ops, transfers, draft_plan, state_plan,
                                      prompt_lp, routed, replay, lora, images)))
        self._in_flight.append(handle)
        return handle

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
                     ep_step, ops: list, transfers=None, draft_plan=None, state_plan=None,
                     prompt_lp: prompt_logprobs.PromptLogprobsPlan | None = None,
                     routed: routed_experts.RoutedExpertsPlan | None = None,
                     replay: np.ndarray | None = None, lora: LoRAStepPlan | None = None,
                     images: StepImages | None = None) -> DeviceResult:
        """The step's device work, in stream order: batch-state fills, KV loads, inputs in (tokens still on the
        device from the steps before it), forward, sampling, the device drafter's drafts, KV saves, results out
        to host memory. Waits for nothing on the host side."""
        t0 = time.perf_counter()
        dev = self.device
        with torch.inference_mode():
            self.batch.apply_device_ops(ops)
            start_transfers(self.kv_connector, transfers, self.kv_blocks, saves=False)
            if self.ep is not None:
                self.ep.all_to_all.begin_step(ep_step)  # the step's dispatch mode (engine/contract/ep_step.py)
            pending_P = self._pending_tokens(inp)
            eager_inputs = staged is None or draft_plan is not None  # a drafter reads them after a replay too
            x = device_inputs(inp, pending_P, dev, self.null_block) if eager_inputs else None
            # The states an EAGLE-3 head reads, kept by the forward itself (None: nothing kept, the normal path).
            aux = self.device_drafter.capture() if draft_plan is not None else None
            state = None
            if state_plan is not None:
                copies = state_plan.copies_in  # prefix hits: before the forward
                self.state_caches.copy([d for d, _ in copies], [c for _, c in copies])
                self.state_caches.zero(state_plan.fresh_decodes)  # one-token first chunks (StatePlan.fresh_decodes)
                if staged is None:  # a replayed graph reads its own static slots (cuda_graph.DecodeGraphs.stage)
                    state = state_plan.state_step(x.attn.query_start_loc_S1, inp.pure_decode, dev)
            if lora is not None:
                begin_lora_step(self.lora, lora, replay=staged is not None)
            if staged is not None:
                h_TD = self.graphs.replay(staged, pending_P)
            else:
                self.model.begin_routing_capture()
                self.model.begin_routing_replay(None if replay is None else routing_replay.to_device(replay, dev))
                splice = None if images is None else ImageSplice(images.rows_M, images.embeds_MD, images.mrope_3T)
                h_TD = self.step_plan.forward(self.model, x.input_ids_T, x.positions_T,
                                              ForwardContext(x.attn, self.kv_caches, x.attn_sliding, aux, state,
                                                             images=splice))
            if lora is not None:
                self.lora.begin_step(None)  # warm-up and other forwards run no adapter
            if state_plan is not None:  # checkpoints of the states this step ended at a block boundary: after
                self.state_caches.copy([ck for ck, _ in state_plan.saves], [slot for _, slot in state_plan.saves])
            res = DeviceResult(read_moe=self._take_moe())
            if routed is not None:
                res.routed_experts = (routed, to_host(routed_experts.gather(self.routing_capture, routed, dev)))
            if prompt_lp is not None:  # scored from the same hidden states, before sampling (which may not run)
                res.prompt_logprobs = (prompt_lp, to_host(prompt_logprobs.score(self.model, h_TD, prompt_lp)))
            if meta is not None and not isinstance(meta, SamplingMetadata):  # a verify step
                res.spec = meta.run(self.model, h_TD, self.tp)  # TP: the group's first rank's tokens
                handle.sampled_R = res.spec.sampled_R
                if state is not None and state.split is not None:
                    # The verifying sequences' states take only their accepted tokens (the last known one and the
                    # accepted drafts: what each emits), on the device: no sync.
                    rollback: DraftRollback = self.model
                    rollback.replay_states(res.spec.emitted_R)
            elif meta is not None:
                self._sample(handle, inp, meta, h_TD, res)
            if draft_plan is not None:  # after the acceptance rule: it drafts from the last accepted position
                res.drafts_RK = self.device_drafter.draft(draft_plan, h_TD, x.input_ids_T, x.positions_T, x.attn,
                                                          handle.sampled_R,
                                                          res.spec.emitted_R if res.spec is not None else None, aux)
            start_transfers(self.kv_connector, transfers, self.kv_blocks, saves=True)
        res.device_s = time.perf_counter() - t0
        return res

    def _lora_moe_only(self):
        """An empty step's LoRA work under EP: the slot writes owed, and whether its dispatch carries slots (as its
        peers' do: the agreed table); None without LoRA."""
        if self.lora is None:
            return None
        return plan_lora_step(self.lora, None, None, self.ep is not None)

    def _device_moe_only(self, ep_step, ops: list, run_forward: bool, transfers=None,
                         lora: LoRAStepPlan | None = None) -> DeviceResult:
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.batch.apply_device_ops(ops)
            if lora is not None:
                begin_lora_step(self.lora, lora)
            start_transfers(self.kv_connector, transfers, self.kv_blocks, saves=False)
            if not run_forward:
                start_transfers(self.kv_connector, transfers, self.kv_blocks, saves=True)
                return DeviceResult()
            if self.ep is not None:
                self.ep.all_to_all.begin_step(ep_step)
            self.step_plan.forward_moe_only(self.model)
            if self.device_drafter is not None:  # the draft layer's collectives, as its peers run them
                self.device_drafter.draft_moe_only()
            res = DeviceResult(read_moe=self._take_moe())
            start_transfers(self.kv_connector, transfers, self.kv_blocks, saves=True)
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
