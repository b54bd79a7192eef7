"""LLMEngine: tokenizer + scheduler + executor + output processing, stepped by its owner.

Not thread-safe: `LLM` steps it in the caller's thread, `AsyncEngine` in its
engine thread. All input validation happens in `process_inputs`, before a
request touches the scheduler, so a rejected request never holds a KV block.

Two halves: the core (scheduler, executor, structured output: `add_core`, `abort_core`, `finish_stopped`,
`step_core`) and the output side (`output_processor`: detokenization, stop strings, logprobs, RequestOutputs).
`add_processed`, `abort_requests` and `step` do both on the calling thread (LLM.generate). An AsyncEngine calls
`hand_off_outputs` once and then only the core half from its engine thread: its output thread owns
`output_processor` from then on.

RL's control calls (weight updates, a trainer's group, pause / continue, sleep / wake_up) are held, not inherited:
`engine.rl` (engine/rl/control.py), which reaches the engine only through engine/rl/host.RLHost.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, cast

from moelink.scheduler.engine_output import EngineCoreOutput, SchedulerStats
from moelink.scheduler.outputs import ModelRunnerOutput, SchedulerOutput
from moelink.scheduler.request import Request, RequestStatus
from moelink.scheduler.router import LeastLoadedRouter
from moelink.scheduler.interface import SchedulerInterface
from moelink.scheduler.scheduler import Scheduler

from ..config.engine_args import EngineArgs, EngineConfig
from ..contract.engine_info import EngineInfo
from ..cluster.elastic import ElasticStats, recover_engine
from ..cluster.rejoin import admit_engine
from ..cluster.executor import Executor, InProcessExecutor, WorkerDiedError
from ..cluster.executor_factory import make_executor
from ..contract.gc_policy import freeze_heap, thaw_heap
from ..contract.expert_parallel import plan_expert_parallel
from ..cluster.eplb_controller import make_eplb_controller, step_expert_load
from .moe_metrics import ExpertLoadReport, MoEMetrics
from .loop_stats import LoopStats
from .output_processor import OutputProcessor
from ..rl.control import RLControl
from .input_processing import (  # noqa: F401  (re-exported: the server and callers import them from here)
    ProcessedRequest, PromptType, process_inputs, too_long,
)
from .outputs import OutputKind, RequestOutput
from ..contract.safe_text import shown
from ..contract.kv_connector import ConfigurableKVConnector
from ..contract.worker_api import LaunchedStep
from ..contract.lora import LoRARequest
from ..contract.sampling_params import SamplingParams
from ..lora.checker import AdapterChecker
from ..lora.loader import AdapterLoader
from ..lora.admission import LoRAAdmission
from ..lora.slot_table import SlotTable
from ..config.lora import routed_lora_refusal
from .startup import set_eplb_slot_bytes, size_kv_cache, warm_up_ranks
from .structured_output import GrammarCompilerPool, StructuredOutputManager
from .no_tokenizer import NoTokenizer, load_tokenizer
from .tokenizer import Tokenizer
from ..multimodal.processor import make_image_processor
from ..multimodal.stats import MultimodalStats
from ..config.worker_config import DUMMY_WARNING

if TYPE_CHECKING:
    from moelink.moe.stats import MoECounters

logger = logging.getLogger(__name__)

PAUSED_POLL_S = 0.01  # how long a step with nothing to do while generation is paused waits


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None,
                 tokenizer: Tokenizer | NoTokenizer | None = None):
        if config.load_format == "dummy":
            logger.warning(DUMMY_WARNING)
        # A dummy model may come without one (engine/core/no_tokenizer.py): token ids in and out only.
        self.tokenizer = tokenizer or load_tokenizer(config.model.model, config.load_format)
        self.eos_token_ids = set(config.model.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        # The workers' samplers hold EOS back under min_tokens: they must know every
        # EOS id the schedulers stop on (generation_config.json, tokenizer too).
        config = replace(config, model=replace(config.model, eos_token_ids=tuple(sorted(self.eos_token_ids))))
        # vLLM's split of them: the tokenizer's EOS ends a request as EOS (stop_reason None); the others
        # (generation_config.json's list) are stop token ids, unless ignore_eos: stop_reason the id, as vLLM's
        # SamplingParams.update_from_generation_config makes them.
        primary = getattr(self.tokenizer, "eos_token_id", None)
        self._eos_ids = frozenset({primary} if primary is not None else self.eos_token_ids)
        self._eos_stop_ids = frozenset(self.eos_token_ids - self._eos_ids)
        # The last request's stop set, by the identity of its params' list: a request's n samples share that list
        # (SamplingParams.sample copies shallowly), so n = 16,384 samples with 1,024 stop ids build one set, not
        # 16,384 on the engine thread (issue 95 item 3).
        self._stop_set: tuple[object, bool, frozenset[int]] = (None, False, frozenset())
        self._arrivals = itertools.count()  # arrival numbers of requests that --seed seeds (_seeded)
        self.grammars = GrammarCompilerPool(self.tokenizer, config.model.vocab_size, self.eos_token_ids, config.grammar)
        if config.grammar.prestart and not isinstance(self.tokenizer, NoTokenizer):
            self.grammars.prestart()  # its process starts while the weights load, not at the first constrained request
        # Built once, here: the workers receive it and expert_load reports the same placement.
        self.ep_plan = plan_expert_parallel(config)
        self.executor = executor or make_executor(config, self.ep_plan)
        # The executor may complete the plan (the Ray placement group's node map): keep the one the ranks got.
        self.ep_plan = getattr(self.executor, "plan", self.ep_plan)
        config = size_kv_cache(self.executor, config)  # sized by the ranks, now that their weights are in
        self.config = config
        # LoRA: requests' adapters checked against the checkpoint here, before a rank reads them (engine/lora/).
        self.lora_checker = (AdapterChecker(config.lora, config.model.model, routed_lora_refusal(config.parallel, config.model.architecture))
                             if config.lora is not None else None)
        # ... and their weights read on a worker thread, the request held back meanwhile (engine/lora/loader.py).
        self.lora_admission: LoRAAdmission[ProcessedRequest] | None = (
            LoRAAdmission(AdapterLoader(config.lora, self.lora_checker.targets, config.model.model))
            if self.lora_checker is not None else None)
        # Data-parallel attention: one scheduler (and KV pool) per rank.
        self.world_size = config.parallel.world_size
        kvc = config.kv_connector  # a KV connector's scheduler half per rank (engine/contract/kv_connector.py)
        if isinstance(kvc, ConfigurableKVConnector):
            # Optional: learn what the sized engine is before the scheduler halves exist (the offload tiers: one
            # block's bytes, which the driver cannot read from ranks in other processes).
            kvc.configure(config)
        # Under tensor parallelism one scheduler per TP group (the group's ranks run one batch).
        self.schedulers: list[SchedulerInterface] = [
            Scheduler(config.scheduler, config.cache, None if kvc is None else kvc.scheduler_side(r))
            for r in range(config.parallel.data_parallel_size)]
        self.router = LeastLoadedRouter(self.schedulers)
        # LoRA with several schedulers: the adapter slot table every rank holds (engine/lora/slot_table.py).
        self.lora_table = (SlotTable(config.lora.num_slots)
                           if config.lora is not None and len(self.schedulers) > 1 else None)
        # The requests the core holds (added, not yet finished), by rank: the engine thread's own record, so
        # that duplicate ids and aborts are decided without reading the output side's states.
        self._rank_of: dict[str, int] = {}
        self.output_processor = OutputProcessor(self.tokenizer)
        # A multimodal checkpoint's processor (engine/multimodal/processor.py), when its images are on; None: a
        # prompt's multi_modal_data is refused (input_processing.check_prompt_dict).
        self.multimodal = make_image_processor(config)
        self.mm_stats = MultimodalStats()
        # Set by hand_off_outputs: where `step` sends each step's core outputs instead of processing them.
        self._output_sink: Callable[[list[EngineCoreOutput]], None] | None = None
        # Per expert-parallel rank (the world, or one when a TP group splits every expert).
        self.moe_metrics = MoEMetrics(len(config.model.sparse_layers), config.model.num_experts, self.ep_plan.world_size)
        self._step_id = 0
        # Online EPLB (--eplb-interval): None when off.
        self.eplb = make_eplb_controller(config, self.ep_plan)
        set_eplb_slot_bytes(self.executor, self.eplb)
        self.structured = StructuredOutputManager(config.model.vocab_size)
        self.elastic_stats = ElasticStats()
        # Elastic EP: per old rank, the SchedulerOutputs of the steps a loss broke (engine/cluster/elastic.py rewinds them).
        self._inflight = None
        # The overlapped loop: (SchedulerOutputs, the executor's LaunchedStep) of the step launched and not yet
        # collected; None when nothing is in flight.
        self._pending: tuple[list[SchedulerOutput], LaunchedStep] | None = None
        self.async_scheduling = config.scheduler.async_scheduling
        self.loop_stats = LoopStats()
        # Single-thread use: outputs of a step a weight update or sleep drained (drain_for_update), returned by the
        # next `step`.
        self._stashed_outputs: list[RequestOutput] | None = None
        # RL's control calls (engine/rl/control.py: weight updates, the trainer's group, pause, versions; its
        # `memory`: sleep / wake_up), held, reaching the engine through what engine/rl/host.RLHost names.
        self.rl = RLControl(self)
        warm_up_ranks(self.executor, config)  # KV cache in place: compile what steps hit, before serving
        # Started: what exists now lives as long as the engine; the step loop's collections skip it.
        freeze_heap(self)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    def info(self) -> EngineInfo:
        """What a front end reports about this engine (fixed once it has started)."""
        cfg = self.config
        return EngineInfo(model=cfg.model, max_model_len=cfg.scheduler.max_model_len,
                          max_num_seqs=cfg.scheduler.max_num_seqs, block_size=cfg.cache.block_size,
                          num_kv_blocks=cfg.cache.num_kv_blocks, expert_parallel_size=cfg.parallel.expert_parallel_size,
                          eos_token_ids=tuple(sorted(self.eos_token_ids)), device=cfg.device,
                          load_format=cfg.load_format, kv_cache_dtype="auto" if cfg.model.kv_cache_dtype is None else "fp8_e4m3",
                          kv_connector=getattr(cfg.kv_connector, "name", ""), kv_role=getattr(cfg.kv_connector, "kv_role", ""),
                          sampling_defaults=dict(cfg.sampling_defaults))

    # -- input validation -----------------------------------------------------
    def process_inputs(self, request_id: str, prompt: PromptType, params: SamplingParams | None,
                       field: str | None = None, compile_grammar: bool = True,
                       lora_request: LoRARequest | None = None, cap_max_tokens: bool = False) -> ProcessedRequest:
        """Tokenize and validate; raises ValueError naming the bad field. Thread-safe (reads only).

        `field`: what messages call the prompt (default "prompt", or "prompt_token_ids" for ids; a server
        passes the name of the proto field it came from). The rules: engine/core/input_processing.py."""
        if self.config.seed is not None and (params is None or params.seed is None):
            params = self._seeded(params)
        return process_inputs(self, request_id, prompt, params, field, compile_grammar, lora_request, cap_max_tokens)

    def _seeded(self, params: SamplingParams | None) -> SamplingParams:
        """vLLM's --seed: a request without a seed gets one from the engine's seed and its arrival number, so
        the same requests in the same order sample the same tokens in every run (a mixed, not a shared,
        generator: a request's draws do not depend on what else is in its batch)."""
        i = next(self._arrivals)  # itertools.count: atomic under the GIL (process_inputs runs on many threads)
        seed = (self.config.seed * 0x9E3779B97F4A7C15 + i) % (1 << 63)
        return replace(params if params is not None else SamplingParams(), seed=seed)

    # -- request lifecycle ----------------------------------------------------
    def add_processed(self, req: ProcessedRequest, output_kind: OutputKind = OutputKind.CUMULATIVE) -> None:
        """Add a validated request to the core and the output side (single-thread use: LLM, tests)."""
        self.add_core(req)
        self.output_processor.add_request(req.request_id, req.prompt, req.prompt_token_ids, req.params, output_kind)

    def add_core(self, req: ProcessedRequest) -> None:
        """Add a validated request to a rank's scheduler, not to the output side (the stepping thread)."""
        self.rl.check_weights_whole()  # asleep, or a failed update left two versions (engine/rl/control.py)
        # Checked here, not per rank: the router may place a duplicate on another rank's scheduler.
        if req.request_id in self._rank_of or (self.lora_admission is not None
                                               and req.request_id in self.lora_admission.waiting):
            raise ValueError(f"request_id={shown(req.request_id)} is already in use by a running request.")
        if self.lora_admission is not None and self.lora_admission.hold(req):
            return  # scheduled once its adapter is in host memory (step_core)
        self._schedule(req)

    def _stop_ids(self, p: SamplingParams) -> frozenset[int]:
        """The ids that stop a request: its own stop_token_ids and, unless ignore_eos, the non-primary EOS ids."""
        given, ignore_eos, ids = self._stop_set
        if given is not p.stop_token_ids or ignore_eos != p.ignore_eos:
            ids = frozenset(p.stop_token_ids) | (self._eos_stop_ids if not p.ignore_eos else frozenset())
            self._stop_set = (p.stop_token_ids, p.ignore_eos, ids)  # holds the list: its id is not reused
        return ids

    def _schedule(self, req: ProcessedRequest) -> None:
        """Put a validated request in a rank's scheduler."""
        p = req.params
        sched_req = Request(
            req.request_id, req.prompt_token_ids, p, max_tokens=req.max_tokens,
            eos_token_ids=self._eos_ids, ignore_eos=p.ignore_eos,
            stop_token_ids=self._stop_ids(p),
            min_tokens=p.min_tokens, client=req.client,
            cache_salt=req.cache_salt, lora_id=req.lora.lora_int_id if req.lora is not None else 0, lora=req.lora,
            multimodal=req.multimodal, must_load=req.must_load,
        )
        if p.structured_outputs is not None:
            if req.grammar is None:
                raise ValueError("SamplingParams.structured_outputs is set but the request was not processed "
                                 "by process_inputs (no compiled grammar).")
            self.structured.add(req.request_id, req.grammar)
        if req.multimodal is not None:
            self.mm_stats.add_request(len(req.multimodal.image_grid_thw), len(req.multimodal.video_grid_thw))
        rank = self.router.route(req.prompt_token_ids, req.cache_salt)
        self.schedulers[rank].add_request(sched_req)
        self._rank_of[req.request_id] = rank
        if p.structured_outputs is not None and not self.structured.ready(req.request_id):
            self.schedulers[rank].held.add(req.request_id)  # until its first mask is filled

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    output_kind: OutputKind = OutputKind.CUMULATIVE) -> None:
        if request_id in self.request_ids():
            raise ValueError(f"request_id={shown(request_id)} is already in use by a running request.")
        self.add_processed(self.process_inputs(request_id, prompt, params), output_kind)

    def abort_requests(self, request_ids, reason: str = "abort") -> list[RequestOutput]:
        """Finish requests now (blocks freed); returns their final outputs (single-thread use: LLM, tests)."""
        request_ids = list(request_ids)
        self.abort_core(request_ids, reason)
        # Every id the output side holds, also one whose core half ended inside a step that raised.
        return [o for o in (self.output_processor.finish(r, reason) for r in request_ids) if o is not None]

    def abort_core(self, request_ids, reason: str = "abort") -> list[str]:
        """End the requests the core holds (blocks freed; finish_reason `reason`: "abort" or "error"), without
        their final outputs (the stepping thread). Returns the ids it ended."""
        request_ids = list(request_ids)
        ids = [r for r in request_ids if r in self._rank_of]
        status = RequestStatus.FINISHED_ABORTED if reason == "abort" else RequestStatus.FINISHED_ERROR
        self._finish(ids, status)
        held = self.lora_admission.drop(request_ids) if self.lora_admission is not None else []
        return ids + held

    def set_backlogged(self, request_id: str, backlogged: bool) -> None:
        """Stop (True) or resume (False) scheduling a request whose consumer lags behind its outputs
        (engine/api/output_thread.py Stream.backlog; Scheduler.backlogged). Ids the core no longer holds are
        ignored, so a late report leaks nothing. The stepping thread."""
        rank = self._rank_of.get(request_id)
        if rank is None:
            return
        sched = self.schedulers[rank]
        if not backlogged:
            sched.backlogged.discard(request_id)
        elif request_id in sched.requests:
            sched.backlogged.add(request_id)

    def finish_stopped(self, request_ids) -> None:
        """End requests the output side found a stop string in (FINISHED_STOPPED, blocks freed; the output side
        made their final outputs). Ids the core no longer holds are ignored. The stepping thread."""
        self._finish(request_ids, RequestStatus.FINISHED_STOPPED)

    def request_ids(self) -> list[str]:
        """The requests the core holds (added, not finished; those waiting for their adapter's read too)."""
        held = list(self.lora_admission.waiting) if self.lora_admission is not None else []
        return self.scheduled_request_ids() + held

    def scheduled_request_ids(self) -> list[str]:
        """The requests the ranks' schedulers hold (added, not finished; not those waiting for an adapter)."""
        return list(self._rank_of)

    def _finish(self, request_ids, status: RequestStatus) -> None:
        request_ids = list(request_ids)
        self.rl.forget_versions(request_ids)
        by_rank: dict[int, list[str]] = {}
        for rid in request_ids:
            self.structured.remove(rid)
            rank = self._rank_of.pop(rid, None)
            if rank is not None:
                self.schedulers[rank].held.discard(rid)
                by_rank.setdefault(rank, []).append(rid)
        # One call per rank for the whole batch: a scheduler filters its waiting and running queues once per call,
        # so ending a batch id by id was quadratic (128,000 sequences of a hung-up /generate held the engine thread
        # for minutes: issue 76 item 2).
        for rank, ids in by_rank.items():
            self.schedulers[rank].finish_requests(ids, status)

    def has_unfinished_requests(self) -> bool:
        return self._lora_waiting() or any(s.has_unfinished_requests() for s in self.schedulers)

    def _lora_waiting(self) -> bool:
        return self.lora_admission is not None and bool(self.lora_admission.waiting)

    def has_requests(self) -> bool:
        """Unfinished requests, a step still in flight, or finished ones the workers have not been told about:
        their ids only travel with the next step, so a loop that stops stepping when the last request finishes
        would leave the workers holding its state."""
        return self._pending is not None or bool(self._stashed_outputs) or self._lora_waiting() or any(
            s.has_unfinished_requests() or s.has_finished_requests() for s in self.schedulers)

    def hand_off_outputs(self, sink: Callable[[list[EngineCoreOutput]], None]) -> None:
        """From now on `step` gives each step's core outputs to `sink` (on the stepping thread, inside the step)
        and returns []; whoever `sink` passes them to owns `output_processor` and finishes stop-string requests
        through `finish_stopped`. AsyncEngine does this once, before its first step: it still steps through
        `step`, so what wraps a step (a test's hook, a benchmark's timer) sees its engine thread's steps."""
        self._output_sink = sink

    def step(self) -> list[RequestOutput]:
        """One lockstep step of every rank (`step_core`) and its output work; returns the outputs it produced
        (none once the outputs are handed off: `hand_off_outputs`)."""
        core_outputs = self.step_core()
        if self._output_sink is not None:
            self._output_sink(core_outputs)
            return []
        stashed, self._stashed_outputs = self._stashed_outputs, None  # drained by a weight update (drain_for_update)
        return (stashed or []) + self._process(core_outputs)

    def _process(self, core_outputs: list[EngineCoreOutput]) -> list[RequestOutput]:
        """The output work of single-thread use: RequestOutputs, and the requests a stop string ended finished."""
        outputs, stopped = self.output_processor.process(core_outputs)
        if stopped:
            self.finish_stopped(stopped)
        return outputs

    def step_core(self) -> list[EngineCoreOutput]:
        """One lockstep step of every rank without its output work; returns the core outputs it collected
        (tokens, finishes) for the output side. The stepping thread.

        Overlapped (async scheduling, the default): schedule and launch step N+1, then collect step N, whose
        device work ran while the host scheduled; step N's tokens are appended and checked for stop tokens now,
        one step after they were sampled. Serial: schedule, run, collect the same step. The loop drains
        (collects the step in flight before scheduling) where the host needs its tokens first: an online-EPLB
        move and a rejoin (every rank between steps). A structured-output row is held back instead until its
        tokens are in and its next mask is filled (off this thread): the others step on."""
        outputs: list[EngineCoreOutput] = []
        if self.executor.rejoin_ready:  # at the step boundary: replacement ranks join, back to EP N
            outputs += self._drain_core()
            admit_engine(self)
        if self.eplb is not None and self.eplb.wants_to_act():
            outputs += self._drain_core()
            if self._eplb_act():
                return outputs
        if self.rl.paused == "keep":  # held in place (engine/rl/control.py): nothing is scheduled
            outputs += self._drain_core()
            if not outputs:
                time.sleep(PAUSED_POLL_S)  # a stepping loop waiting for continue_generation does not spin
            return outputs
        if self.structured:
            self._release_held(self.structured.poll())
        admission = self.lora_admission
        if admission is not None and admission.waiting:  # adapters read since: their requests are scheduled now (or
            # end: the read failed); with nothing else to run, wait briefly for a read rather than spin
            outputs += admission.admit(self._schedule, wait=self._pending is None and not any(
                s.has_unfinished_requests() for s in self.schedulers))
        sched_outs = [s.schedule() for s in self.schedulers]
        self._step_id += 1
        if self.lora_table is not None:  # one slot table for every rank (DP attention): engine/lora/slot_table.py
            self._agree_lora_slots(self.lora_table, sched_outs)
        if all(so.is_empty for so in sched_outs):
            # Nothing to compute: what is in flight is all there is (its tokens may schedule more). A step that
            # only carries ids for the workers (finished, preempted, a resync) or KV transfers (started or awaited)
            # runs at once; an empty one not at all, so a loop with nothing left in flight stops.
            outputs += self._drain_core()
            if not any(so.finished_req_ids or so.preempted_req_ids or so.resync is not None
                       or so.kv_transfers is not None for so in sched_outs):
                for sched, so in zip(self.schedulers, sched_outs):
                    sched.update_from_output(so, ModelRunnerOutput(step_id=so.step_id))
                if not outputs and self.structured.filling():
                    # Only held requests are left: wait (briefly) for a mask rather than spin on empty steps.
                    self._release_held(self.structured.poll(timeout=0.05))
                elif not outputs and self.rl.paused is not None:
                    time.sleep(PAUSED_POLL_S)  # only requests the pause keeps waiting are left
                elif not outputs and any(s.backlogged for s in self.schedulers):
                    time.sleep(PAUSED_POLL_S)  # only requests whose consumers lag are left: no spinning meanwhile
                return outputs
            self._pending = (sched_outs, self.executor.launch(sched_outs))
            return outputs + self._drain_core()
        if self.structured:
            # A constrained request is scheduled only with its mask ready (filled off this thread, after its tokens
            # in flight were collected): it is held again until the tokens of this step are in and its next mask is.
            for sched, so in zip(self.schedulers, sched_outs):  # each rank gets the masks of its own rows only
                so.grammar_bitmask = self.structured.bitmasks(so.num_scheduled_tokens, so.scheduled_spec_tokens)
                sched.held.update(so.grammar_bitmask)
        if admission is not None and admission.started and not isinstance(self.executor, InProcessExecutor):
            # Ranks in other processes read the adapters held back too, on their own thread (engine/lora/slots.py).
            prefetch = admission.take_started()
            for so in sched_outs:
                so.lora_prefetch = prefetch
        t0 = time.perf_counter()
        try:
            launched = self.executor.launch(sched_outs)
        except WorkerDiedError as err:
            return outputs + self._recover([p for p in (self._pending, (sched_outs, None)) if p is not None], err)
        self.loop_stats.launch_s += time.perf_counter() - t0
        tokens = sum(so.total_num_scheduled_tokens for so in sched_outs)
        if tokens:
            self.loop_stats.note_step_tokens(tokens)
        done, self._pending = self._pending, (sched_outs, launched)
        if done is not None:
            outputs += self._collect(done)
        if not self.async_scheduling:
            outputs += self._drain_core()
        self.loop_stats.steps += 1
        return outputs

    def _agree_lora_slots(self, table: SlotTable, sched_outs: list[SchedulerOutput]) -> None:
        """Put the adapters this step runs, on any rank, in the one slot table and give every rank its snapshot."""
        needed = [lora for sched, so in zip(self.schedulers, sched_outs) for rid in so.num_scheduled_tokens
                  if isinstance(lora := sched.requests[rid].lora, LoRARequest)]
        snapshot = table.assign(needed)
        for so in sched_outs:
            so.lora_table = snapshot

    def drain_for_update(self) -> None:
        """Collect the step in flight before any rank writes (a weight update, sleep: engine/rl/); its outputs go
        where a step's go (the output thread's sink, or the next `step`'s return), never lost: a request may have
        finished in it."""
        core_outputs = self._drain_core()
        if not core_outputs:
            return
        if self._output_sink is not None:
            self._output_sink(core_outputs)
        else:
            self._stashed_outputs = (self._stashed_outputs or []) + self._process(core_outputs)

    def _drain(self) -> list[RequestOutput]:
        """Collect the step in flight, if any, and process its outputs (single-thread use: a caller that needs
        nothing in flight between two steps)."""
        return self._process(self._drain_core())

    def _drain_core(self) -> list[EngineCoreOutput]:
        """Collect the step in flight, if any (nothing is in flight afterwards)."""
        done, self._pending = self._pending, None
        return self._collect(done) if done is not None else []

    def _collect(self, done: tuple[list[SchedulerOutput], LaunchedStep]) -> list[EngineCoreOutput]:
        """Take a launched step's outputs: scheduler updates, metrics, structured-output matchers."""
        sched_outs, launched = done
        t0 = time.perf_counter()
        try:
            runner_outs = self.executor.collect(launched)
        except WorkerDiedError as err:
            steps = [done] + ([self._pending] if self._pending is not None else [])
            self._pending = None
            return self._recover(steps, err)
        self.loop_stats.collect_s += time.perf_counter() - t0
        self.loop_stats.wait_s += max((ro.stats.wait_s for ro in runner_outs if ro.stats is not None), default=0.0)
        core_outputs = []
        for sched, so, ro in zip(self.schedulers, sched_outs, runner_outs):
            core_outputs.extend(sched.update_from_output(so, ro))
        if self.multimodal is not None:
            for ro in runner_outs:
                self.mm_stats.add_step(ro.stats)
        # A rank's StepStats.moe (typed by the scheduler's MoEStepCounters protocol) is moe/stats.py's MoECounters.
        self.moe_metrics.add_step(cast("list[MoECounters | None]",
                                       [ro.stats.moe if ro.stats is not None else None for ro in runner_outs]))
        if self.eplb is not None:
            counts_LG, pairs_LR = step_expert_load(runner_outs, self.moe_metrics)
            self.eplb.record(counts_LG, pairs_LR)
        self.rl.stamp_versions(core_outputs)  # the weight version that computed them
        structured = self.structured
        constrained = bool(structured)
        for co in core_outputs:
            if constrained and co.new_token_ids:
                structured.accept(co.request_id, co.new_token_ids)  # starts its next mask's fill
            if co.finish_reason is not None:
                self._rank_of.pop(co.request_id, None)
                structured.remove(co.request_id)
        if constrained:
            # Held since this step: free again unless a fill is running (a prefill chunk that sampled nothing,
            # a grammar that ended, a request that finished).
            for sched, so in zip(self.schedulers, sched_outs):
                if sched.held:
                    sched.held.difference_update([rid for rid in so.num_scheduled_tokens if structured.ready(rid)])
        return core_outputs

    def _release_held(self, request_ids) -> None:
        """Requests whose grammar mask is ready may be scheduled again."""
        for rid in request_ids:
            rank = self._rank_of.get(rid)
            if rank is not None:
                self.schedulers[rank].held.discard(rid)

    def _eplb_act(self) -> bool:
        """Online EPLB's move at a step boundary (nothing in flight). True when a rank was lost during it and
        the engine recovered (elastic EP: the steps before were all collected, so nothing is undone)."""
        try:
            self.eplb.act(self.executor.collective)
        except WorkerDiedError:
            if self.executor.lost_error is None:
                raise
            recover_engine(self)
            return True
        return False

    def _recover(self, steps: list, err: WorkerDiedError) -> list[EngineCoreOutput]:
        """Elastic EP: the steps in flight (oldest first) are dropped; survivors undo them (Scheduler.rewind)."""
        if self.executor.lost_error is None:  # not elastic, or nothing to recover from: fail as before
            raise err
        # Per scheduler (one per rank, or per TP group under TP), as the steps hold them.
        self._inflight = [[so_per_rank[r] for so_per_rank, _ in steps] for r in range(len(self.schedulers))]
        recover_engine(self)
        return []

    def take_inflight(self) -> list | None:
        """Elastic EP, once per regroup: per old rank, the SchedulerOutputs of the steps the loss broke (set by
        `_recover`; None when the loss came between steps). Cleared: a later regroup has other ranks."""
        inflight, self._inflight = self._inflight, None
        return inflight

    def index_requests(self) -> None:
        """Re-learn which rank holds each request from the schedulers (after a regroup moved them)."""
        self._rank_of = {rid: rank for rank, s in enumerate(self.schedulers) for rid in s.requests}

    def experts_on_ranks(self) -> list[list[tuple[int, int]]]:
        """Per rank: (logical expert, number of replicas of it) for each expert slot it holds."""
        p = self.ep_plan.placement  # at one rank: every expert once
        copies = [len(r) for r in p.log2phy]
        return [[(e, copies[e]) for e in p.experts_on_rank(r)] for r in range(p.ep_size)]

    def expert_load(self) -> ExpertLoadReport:
        """Raw expert-load counts since start: [MoE layer][expert] routed (token, expert) pairs."""
        return self.moe_metrics.report(self.config.model.sparse_layers, self.config.model.top_k,
                                       self.experts_on_ranks(), self.eplb)

    def rank_stats(self) -> list[SchedulerStats]:
        return [s.stats() for s in self.schedulers]

    def stats(self) -> SchedulerStats:
        """All ranks together (sums; kv_usage over the pooled blocks)."""
        return SchedulerStats.combine(self.rank_stats())

    def check_health(self) -> None:
        """Raise the executor's error once a rank is lost (dead, hung, silent), even between steps; with
        elastic EP, recover from the loss instead when the survivors can go on (engine/cluster/elastic.py), and admit
        replacement ranks that are ready (engine/cluster/rejoin.py). With a step in flight both wait for `step`, which
        undoes that step on a recovery (its tokens never come back) and drains it before an admission."""
        if self._pending is None:
            if self.executor.lost_error is not None:
                recover_engine(self)
            elif self.executor.rejoin_ready:
                admit_engine(self)
        self.executor.check_health()

    def shutdown(self) -> None:
        if self.lora_admission is not None:
            self.lora_admission.shutdown()
        self.grammars.shutdown()
        self.structured.shutdown()
        thaw_heap(self)  # first: the executor's collect then reaches the engine's cycles (gc_policy.py)
        self.executor.shutdown()
