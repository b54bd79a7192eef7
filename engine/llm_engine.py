"""LLMEngine: tokenizer + scheduler + executor + output processing, stepped by its owner.

Not thread-safe: `LLM` steps it in the caller's thread, `AsyncEngine` in its
engine thread. All input validation happens in `process_inputs`, before a
request touches the scheduler, so a rejected request never holds a KV block.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Union

from moelink.scheduler.engine_output import SchedulerStats
from moelink.scheduler.request import Request, RequestStatus
from moelink.scheduler.router import LeastLoadedRouter
from moelink.scheduler.scheduler import Scheduler

from .engine_args import EngineArgs, EngineConfig
from .engine_info import EngineInfo
from .elastic import ElasticStats, recover_engine
from .rejoin import admit_engine
from .executor import Executor, WorkerDiedError
from .executor_factory import make_executor
from .expert_parallel import plan_expert_parallel
from .eplb_controller import make_eplb_controller, step_expert_load
from .moe_metrics import ExpertLoadReport, MoEMetrics
from .output_processor import OutputProcessor
from .outputs import OutputKind, RequestOutput
from .safe_text import shown
from .sampling_params import SamplingParams
from .structured_output import GrammarCompilerPool, StructuredOutputManager
from .tokenizer import Tokenizer
from .warmup import warm_up_engine

logger = logging.getLogger(__name__)

PromptType = Union[str, list[int], dict]


def too_long(field: str, num_tokens: int, max_model_len: int) -> ValueError:
    return ValueError(f"{field} has {num_tokens} tokens, too long: max_model_len={max_model_len} leaves room for "
                      f"at most {max_model_len - 1} prompt tokens.")


def max_tokens_too_large(field: str, max_tokens: int, num_prompt_tokens: int, max_model_len: int) -> ValueError:
    """vLLM's wording (its OpenAI server's 400), with the numbers: what was asked, what the prompt took."""
    return ValueError(
        f"SamplingParams.max_tokens={max_tokens} is too large: this model's maximum context length is "
        f"{max_model_len} tokens and the {field} has {num_prompt_tokens} tokens ({max_tokens} > {max_model_len} - "
        f"{num_prompt_tokens}); ask for at most {max_model_len - num_prompt_tokens}, or leave max_tokens unset "
        f"to generate up to the context.")


def _first_bad_id(ids: list, vocab: int) -> int | None:
    """Index of the first entry that is not an int in [0, vocab), or None; C-speed when all are fine."""
    if not ids or (set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < vocab):
        return None
    return next(i for i, t in enumerate(ids) if type(t) is not int or not 0 <= t < vocab)


@dataclass
class ProcessedRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    # xgrammar CompiledGrammar when params.structured_outputs is set (compiled in process_inputs).
    grammar: object = None


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer or Tokenizer.from_dir(config.model.model)
        self.eos_token_ids = set(config.model.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        # The workers' samplers hold EOS back under min_tokens: they must know every
        # EOS id the schedulers stop on (generation_config.json, tokenizer too).
        config = replace(config, model=replace(config.model, eos_token_ids=tuple(sorted(self.eos_token_ids))))
        # Built once, here: the workers receive it and expert_load reports the same placement.
        self.ep_plan = plan_expert_parallel(config)
        self.executor = executor or make_executor(config, self.ep_plan)
        # The executor may complete the plan (the Ray placement group's node map): keep the one the ranks got.
        self.ep_plan = getattr(self.executor, "plan", self.ep_plan)
        if config.cache.num_kv_blocks is None:
            # Sized by the ranks themselves, now that their weights are in memory.
            try:
                blocks = self.executor.initialize_kv_cache()
            except BaseException:
                self.executor.shutdown()  # no worker outlives a failed start
                raise
            config = replace(config, cache=replace(config.cache, num_kv_blocks=blocks))
        self.config = config
        # Data-parallel attention: one scheduler (and KV pool) per rank.
        self.world_size = config.parallel.world_size
        self.schedulers = [Scheduler(config.scheduler, config.cache) for _ in range(self.world_size)]
        self.router = LeastLoadedRouter(self.schedulers)
        self._rank_of: dict[str, int] = {}
        self.output_processor = OutputProcessor(self.tokenizer)
        self.moe_metrics = MoEMetrics(len(config.model.sparse_layers), config.model.num_experts, self.world_size)
        self._step_id = 0
        # Online EPLB (--eplb-interval): None when off.
        self.eplb = make_eplb_controller(config, self.ep_plan)
        if self.eplb is not None:
            # At start-up, not at the first move: the ranks' slot sizes (the staging budget's unit), and a layer
            # holding a tensor a move could not carry refuses EPLB here (moe/expert_move.py slot_bytes), as
            # does a staging budget no expert fits in.
            try:
                self.eplb.set_slot_bytes(self.executor._collective("eplb_slot_bytes")[0])
            except BaseException:
                self.executor.shutdown()  # no worker outlives a failed start
                raise
        self.grammars = GrammarCompilerPool(self.tokenizer, config.model.vocab_size, self.eos_token_ids)
        self.structured = StructuredOutputManager(config.model.vocab_size)
        self.elastic_stats = ElasticStats()
        self._inflight = None  # the SchedulerOutputs of the step now running (elastic EP: see step)
        try:
            warm_up_engine(self.executor, config)  # KV cache in place: compile what steps hit, before serving
        except BaseException:
            self.executor.shutdown()  # no worker outlives a failed start
            raise

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    def info(self) -> EngineInfo:
        """What a front end reports about this engine (fixed once it has started)."""
        cfg = self.config
        return EngineInfo(model=cfg.model, max_model_len=cfg.scheduler.max_model_len,
                          max_num_seqs=cfg.scheduler.max_num_seqs, block_size=cfg.cache.block_size,
                          num_kv_blocks=cfg.cache.num_kv_blocks, expert_parallel_size=cfg.parallel.expert_parallel_size,
                          eos_token_ids=tuple(sorted(self.eos_token_ids)), device=cfg.device)

    # -- input validation -----------------------------------------------------
    def process_inputs(self, request_id: str, prompt: PromptType, params: SamplingParams | None,
                       field: str | None = None) -> ProcessedRequest:
        """Tokenize and validate; raises ValueError naming the bad field. Thread-safe (reads only).

        `field`: what messages call the prompt (default "prompt", or "prompt_token_ids" for ids; a server
        passes the name of the proto field it came from).
        """
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id={shown(request_id)} is invalid: must be a non-empty string.")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params={shown(params)} is invalid: must be a SamplingParams.")
        text = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt dict is invalid: it needs a 'prompt' or 'prompt_token_ids' key.")
        field = field or ("prompt" if isinstance(prompt, str) else "prompt_token_ids")
        if isinstance(prompt, str):
            text = prompt
            if not prompt:
                raise ValueError(f"{field} is empty: give at least one character or token id.")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
        else:
            raise ValueError(f"{field} of type {type(prompt).__name__} is invalid: pass a string or a list of token ids.")
        if not ids:
            raise ValueError(f"{field} is empty: give at least one character or token id.")
        max_len = self.config.scheduler.max_model_len
        if len(ids) >= max_len:  # before looking at each id: a long list is refused at no cost
            raise too_long(field, len(ids), max_len)
        vocab = self.config.model.vocab_size
        bad = _first_bad_id(ids, vocab)
        if bad is not None:
            name = f"{field}[{bad}]" if text is None else f"{field} token {bad}"
            raise ValueError(f"{name}={shown(ids[bad])} is out of range: token ids must be integers in [0, {vocab}).")
        bs, blocks = self.config.cache.block_size, self.config.cache.num_kv_blocks
        # The prompt and its first sampled token must fit what one sequence may hold alone: the whole pool, or
        # less when the sliding-window layers' blocks come from the same pool (Scheduler.pool_tokens).
        if len(ids) + 1 > self.schedulers[0].pool_tokens:
            alone = "" if self.config.cache.sliding_window is None else (
                f", of which one sequence may use {self.schedulers[0].pool_tokens} tokens beside its "
                "sliding-window layers' blocks")
            raise ValueError(
                f"{field} has {len(ids)} tokens, more than the KV cache holds ({blocks} blocks of {bs} tokens"
                f"{alone}): raise num_kv_blocks / kv_cache_memory_bytes or shorten the prompt."
            )
        bad = _first_bad_id(params.stop_token_ids, vocab)
        if bad is not None:
            raise ValueError(f"SamplingParams.stop_token_ids contains {shown(params.stop_token_ids[bad])}: "
                             f"token ids must be in [0, {vocab}).")
        room = max_len - len(ids)
        if params.max_tokens is not None and params.max_tokens > room:
            # Refused, not clamped (vLLM answers 400): a client that asked for N tokens and silently got fewer
            # would read finish_reason="length" as its own limit.
            raise max_tokens_too_large(field, params.max_tokens, len(ids), max_len)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        grammar = None
        if params.structured_outputs is not None:
            # Compiled on the grammar pool; this caller waits, the engine loop does not.
            grammar = self.grammars.compile(params.structured_outputs)
        return ProcessedRequest(request_id, text, ids, params, max_tokens, grammar)

    # -- request lifecycle ----------------------------------------------------
    def add_processed(self, req: ProcessedRequest, output_kind: OutputKind = OutputKind.CUMULATIVE) -> None:
        # Checked here, not per rank: the router may place a duplicate on another rank's scheduler.
        if req.request_id in self.output_processor.states:
            raise ValueError(f"request_id={shown(req.request_id)} is already in use by a running request.")
        p = req.params
        sched_req = Request(
            req.request_id, req.prompt_token_ids, p, max_tokens=req.max_tokens,
            eos_token_ids=frozenset(self.eos_token_ids), ignore_eos=p.ignore_eos,
            stop_token_ids=frozenset(p.stop_token_ids), min_tokens=p.min_tokens,
        )
        if p.structured_outputs is not None:
            if req.grammar is None:
                raise ValueError("SamplingParams.structured_outputs is set but the request was not processed "
                                 "by process_inputs (no compiled grammar).")
            self.structured.add(req.request_id, req.grammar)
        rank = self.router.route(req.prompt_token_ids)
        self.schedulers[rank].add_request(sched_req)
        self._rank_of[req.request_id] = rank
        self.output_processor.add_request(req.request_id, req.prompt, req.prompt_token_ids, p, output_kind)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    output_kind: OutputKind = OutputKind.CUMULATIVE) -> None:
        if request_id in self.output_processor.states:
            raise ValueError(f"request_id={shown(request_id)} is already in use by a running request.")
        self.add_processed(self.process_inputs(request_id, prompt, params), output_kind)

    def abort_requests(self, request_ids, reason: str = "abort") -> list[RequestOutput]:
        """Finish requests now (blocks freed); returns their final outputs."""
        ids = [r for r in request_ids if r in self.output_processor.states]
        status = RequestStatus.FINISHED_ABORTED if reason == "abort" else RequestStatus.FINISHED_ERROR
        self._finish(ids, status)
        return [o for o in (self.output_processor.finish(r, reason) for r in ids) if o is not None]

    def _finish(self, request_ids, status: RequestStatus) -> None:
        for rid in request_ids:
            self.structured.remove(rid)
            rank = self._rank_of.pop(rid, None)
            if rank is not None:
                self.schedulers[rank].finish_requests([rid], status)

    def has_unfinished_requests(self) -> bool:
        return any(s.has_unfinished_requests() for s in self.schedulers)

    def has_requests(self) -> bool:
        """Unfinished requests, or finished ones the workers have not been told about:
        their ids only travel with the next step, so a loop that stops stepping when
        the last request finishes would leave the workers holding its state."""
        return any(s.has_unfinished_requests() or s.has_finished_requests() for s in self.schedulers)

    def step(self) -> list[RequestOutput]:
        """One lockstep step of every rank; returns the outputs it produced."""
        if self.executor.rejoin_ready:  # at the step boundary: replacement ranks join, back to EP N
            admit_engine(self)
        sched_outs = [s.schedule() for s in self.schedulers]
        self._step_id += 1
        if self.structured:
            for so in sched_outs:  # each rank gets the masks of its own rows only
                so.grammar_bitmask = self.structured.bitmasks(so.num_scheduled_tokens)
        # Elastic EP: the step a loss breaks, undone on the survivors that keep their requests (Scheduler.rewind).
        self._inflight = sched_outs
        try:
            runner_outs = self.executor.execute(sched_outs)
        except WorkerDiedError:
            if self.executor.lost_error is None:  # not elastic, or nothing to recover from: fail as before
                raise
            # Elastic EP: the step is dropped; every unfinished request is requeued on the survivors.
            recover_engine(self)
            return []
        self._inflight = None
        core_outputs = []
        for sched, so, ro in zip(self.schedulers, sched_outs, runner_outs):
            core_outputs.extend(sched.update_from_output(so, ro))
        self.moe_metrics.add_step([ro.stats.moe if ro.stats is not None else None for ro in runner_outs])
        lost_in_move = False
        if self.eplb is not None:  # at the step boundary: every rank is between steps
            counts_LG, pairs_LR = step_expert_load(runner_outs, self.moe_metrics)
            try:
                self.eplb.after_step(counts_LG, self.executor._collective, pairs_LR)
            except WorkerDiedError:
                if self.executor.lost_error is None:
                    raise
                # Elastic EP, a rank lost during an expert move: this step's tokens are good (the step ended on
                # every rank); they are streamed below, then the survivors re-form (engine/elastic.py).
                lost_in_move = True
        for co in core_outputs:
            if self.structured and co.new_token_ids:
                self.structured.accept(co.request_id, co.new_token_ids)
            if co.finish_reason is not None:
                self._rank_of.pop(co.request_id, None)
                self.structured.remove(co.request_id)
        outputs, stopped = self.output_processor.process(core_outputs)
        if stopped:
            self._finish(stopped, RequestStatus.FINISHED_STOPPED)
        if lost_in_move:
            recover_engine(self)
        return outputs

    def experts_on_ranks(self) -> list[list[tuple[int, int]]]:
        """Per rank: (logical expert, number of replicas of it) for each expert slot it holds."""
        p = self.ep_plan.placement  # at one rank: every expert once
        copies = [len(r) for r in p.log2phy]
        return [[(e, copies[e]) for e in p.experts_on_rank(r)] for r in range(self.world_size)]

    def expert_load(self) -> ExpertLoadReport:
        """Raw expert-load counts since start: [MoE layer][expert] routed (token, expert) pairs."""
        m = self.moe_metrics
        return ExpertLoadReport(
            moe_layers=tuple(self.config.model.sparse_layers), num_experts=m.num_experts,
            top_k=self.config.model.top_k, world_size=self.world_size,
            experts_on_ranks=tuple(tuple(e for e, _ in held) for held in self.experts_on_ranks()),
            tokens_per_expert_LG=tuple(map(tuple, m.tokens_per_expert.tolist())),
            bytes_dispatched=m.bytes_dispatched, bytes_combined=m.bytes_combined, steps=m.steps,
            experts_on_ranks_per_layer=self.eplb.experts_on_ranks_per_layer() if self.eplb else (),
            eplb=self.eplb.snapshot() if self.eplb else None)

    def rank_stats(self) -> list[SchedulerStats]:
        return [s.stats() for s in self.schedulers]

    def stats(self) -> SchedulerStats:
        """All ranks together (sums; kv_usage over the pooled blocks)."""
        per_rank = self.rank_stats()
        if len(per_rank) == 1:
            return per_rank[0]
        total = sum(s.num_total_blocks for s in per_rank)
        free = sum(s.num_free_blocks for s in per_rank)
        return SchedulerStats(
            num_running=sum(s.num_running for s in per_rank), num_waiting=sum(s.num_waiting for s in per_rank),
            kv_usage=sum(s.kv_usage * s.num_total_blocks for s in per_rank) / total, num_free_blocks=free,
            num_total_blocks=total, prefix_cache_queries=sum(s.prefix_cache_queries for s in per_rank),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in per_rank),
            num_preemptions_total=sum(s.num_preemptions_total for s in per_rank),
        )

    def check_health(self) -> None:
        """Raise the executor's error once a rank is lost (dead, hung, silent), even between steps; with
        elastic EP, recover from the loss instead when the survivors can go on (engine/elastic.py), and admit
        replacement ranks that are ready (engine/rejoin.py)."""
        if self.executor.lost_error is not None:
            recover_engine(self)
        elif self.executor.rejoin_ready:
            admit_engine(self)
        self.executor.check_health()

    def shutdown(self) -> None:
        self.grammars.shutdown()
        self.executor.shutdown()
