"""Plain dataclasses that cross the scheduler ↔ worker boundary (ARCHITECTURE.md: Design rules 12).

Nothing here imports torch: these objects are pickled to Ray workers and back,
so they hold only Python ints, strings, lists and dicts.

A step is described *incrementally*: a request is sent in full once
(`NewRequestData`) and afterwards only by what changed (`CachedRequestData`).
The worker keeps each request's token ids and block table between steps and
appends the tokens it samples itself, exactly as the scheduler does, so both
sides agree on `all_token_ids` without shipping them every step.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Protocol


class SamplingOptions(Protocol):
    """What the scheduler and the worker read of a request's sampling parameters.

    The engine's `SamplingParams` has these fields (and more); the scheduler only carries the object
    to the worker (and reads the stop rules when a Request is built from it), so it names the shape
    here instead of importing the engine. Scheduler tests pass None.
    """

    # The scheduler: when a request stops (Request.from_sampling_params).
    max_tokens: Optional[int]
    min_tokens: int
    ignore_eos: bool
    stop_token_ids: list[int]
    # The worker: its generator, and how each next token is drawn.
    seed: Optional[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logprobs: Optional[int]
    prompt_logprobs: Optional[int]  # set: every prompt token is computed (no prefix-cache or KV-load hit)
    return_routed_experts: bool  # likewise


class MoEStepCounters(Protocol):
    """A rank's MoE counters of one step as the engine reads them (moe/stats.py's `MoECounters` is one: expert
    load, all-to-all rows, bytes and times). Named here as a shape, since the scheduler imports neither torch nor
    the MoE layer."""

    tokens_per_expert: Any  # int64 [L, G] array
    bytes_dispatched: int
    tokens_dispatched: int
    wire_rows: int
    wire_bytes: int
    ep_mode: str
    pairs_computed_per_layer: list[int]


class EPStep(Protocol):
    """The driver's per-step expert-parallel plan as a worker reads it (engine/contract/ep_step.py's `EPStepPlan` is
    one): the step's dispatch mode, its largest tokens per rank, and the decode graph size every rank replays
    (None: eager). Named here as a shape, since the scheduler imports neither the engine nor comm."""

    @property
    def mode(self) -> str: ...

    @property
    def max_tokens_per_rank(self) -> int: ...

    @property
    def graph_batch(self) -> Optional[int]: ...


@dataclass
class NewRequestData:
    """A request the worker has not seen (or has dropped after a preemption)."""

    req_id: str
    prompt_token_ids: list[int]
    # Tokens generated before a preemption: recomputed like prompt tokens, but
    # they count as output for penalties and stop checks.
    output_token_ids: list[int]
    # Carried, not read, by the scheduler: the engine's SamplingParams (a plain dataclass).
    sampling_params: Optional[SamplingOptions]
    block_ids: list[int]
    # Tokens whose KV is already in `block_ids` (prefix-cache hits).
    num_computed_tokens: int
    # The sliding-window group's table when it has its own (CacheConfig.sliding_window), -1 where no query can
    # see a block (scheduler/sliding_kv.py); empty otherwise.
    sliding_block_ids: list[int] = field(default_factory=list)
    # A model with per-sequence state (linear attention, scheduler/hybrid_cache.py): the request's state slot, and
    # the checkpoint slot its state starts as a copy of (a prefix hit); -1: none (from zeros when nothing is
    # computed, else the slot's own state).
    state_slot: int = -1
    state_copy_from: int = -1
    # Carried, not read, by the scheduler: the request's LoRA adapter (the engine's LoRARequest); None: the base.
    lora: Any = None
    # Carried, not read, by the scheduler: the request's images as the driver processed them
    # (engine/multimodal/inputs.MultimodalInputs); None: a text request.
    multimodal: Any = None


@dataclass(slots=True)
class CachedRequestData:
    """A request the worker already holds: only its new blocks and progress."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    # The sliding group's new ids (appended to its table). Entries that left the window are not sent: the worker
    # nulls them by the same rule (sliding_kv.first_live_sliding_block).
    new_sliding_block_ids: list[int] = field(default_factory=list)

    def __reduce__(self):
        # Pickled once per running request per step by the multiprocess executor (engine/cluster/mp_executor.py): a
        # plain tuple of the fields is ~2x cheaper than the default's (64 requests: ~64 -> ~30 us). Every field, in
        # declaration order (_CACHED_FIELDS, read from the dataclass: a field added later travels too).
        return (CachedRequestData, _CACHED_FIELDS(self))


_CACHED_FIELDS = operator.attrgetter(*(f.name for f in fields(CachedRequestData)))


@dataclass
class RequestResync:
    """Elastic EP, a survivor that kept its model runner (engine/rank/keep_runner.py): the worker replaces its request
    states by these before its next step, because the step the lost rank broke may have changed them on one side
    only (scheduled but never run, or run but never answered). `running`: every running request as the scheduler
    holds it now (its blocks, its tokens, what is computed); `waiting_ids`: the preempted ones waiting to resume
    (their seeded generators stay parked)."""

    running: list[NewRequestData]
    waiting_ids: frozenset[str]


@dataclass
class SchedulerOutput:
    """What one engine step computes on one rank.

    `num_scheduled_tokens[req_id] = n` means: compute the tokens at positions
    `[num_computed_tokens, num_computed_tokens + n)` of that request. There is
    no prefill or decode phase; a prompt chunk is just n > 1.
    """

    step_id: int
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    # The worker drops its state for these (finished, aborted or preempted
    # since the previous step) before running this step.
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    # Structured output: per constrained request scheduled this step, its allowed next tokens as
    # little-endian int32 bitmask words (bytes; filled by the engine, engine/core/structured_output.py).
    grammar_bitmask: dict[str, bytes] = field(default_factory=dict)
    # Expert parallelism: the step's dispatch plan (an EPStep: engine.ep_step.EPStepPlan), the same object on
    # every rank, set by the driver's executor; None without EP.
    ep_step: Optional[EPStep] = None
    # Elastic EP: set on the first step after a recovery that kept this rank's runner (Scheduler.rewind).
    resync: Optional[RequestResync] = None
    # KV connector (scheduler/kv_connector.py): the transfers this step starts and whether any are awaited; None
    # without a connector, or when none is under way (then the worker does no transfer work at all).
    kv_transfers: Optional[KVTransferPlan] = None
    # Speculative decoding: per request, the draft tokens this step verifies (scheduled after the request's last
    # known token: num_scheduled_tokens counts them). Empty without a drafter.
    scheduled_spec_tokens: dict[str, list[int]] = field(default_factory=dict)
    # Speculative decoding: requests whose drafts the next step would not verify (drafts that keep failing wait
    # for their next probe: scheduler/draft_control.py), so the worker's host drafter skips them. Empty without one.
    no_draft_req_ids: set[str] = field(default_factory=set)
    # Per-sequence state (scheduler/hybrid_cache.py): per request, the checkpoint slot its state is copied into
    # after this step (its chunk ends at the prompt's last whole block). Empty for models without such state.
    state_saves: dict[str, int] = field(default_factory=dict)
    # LoRA under DP attention (several schedulers): the driver's adapter slot table (engine/lora/slot_table.py), the
    # same tuple on every rank's output: slot ids travel with dispatched tokens, so they must mean one adapter
    # everywhere. Carried, not read, by the scheduler; None with one scheduler (each rank's runner gives slots).
    lora_table: Optional[tuple] = None
    # LoRA: the adapters (LoRARequests) whose weights the driver started reading (engine/lora/loader.py) for requests it
    # holds back: a rank in another process starts its own read of them off its step loop (engine/lora/slots.py
    # HostAdapters.prefetch). Carried, not read, by the scheduler; empty when the ranks share the driver's process.
    lora_prefetch: tuple = ()

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(frozen=True)
class KVTransfer:
    """One request's KV blocks to copy out of (save) or into (load) a rank's paged KV cache
    (scheduler/kv_connector.py). Both tables are the request's, from its first block: `block_ids` the
    full-attention group's, `sliding_block_ids` the sliding-window group's when it has its own (NULL_BLOCK, -1,
    where a block left the window and holds nothing a later query reads; empty otherwise). Blocks before
    `first_block` are not copied (a load: the rank's prefix cache holds them already). The KV covers positions
    [0, num_tokens); `token_ids` (saves) are those tokens, what a store checks a later load against. A hybrid
    model's transfer carries its state slot too: the state after `num_tokens` tokens moves beside the blocks."""

    transfer_id: int  # unique per scheduler; the worker reports it back (ModelRunnerOutput.kv_transfers_done)
    req_id: str
    block_ids: list[int]
    num_tokens: int
    first_block: int = 0
    sliding_block_ids: list[int] = field(default_factory=list)
    token_ids: tuple[int, ...] = ()
    # A load's source, as the connector's scheduler half describes it to its worker half (`KVConnector.load_params`:
    # a network transport's address and key); plain data, pickled to the ranks. None: the connector needs none.
    params: Any = None
    # The request's state slot on this rank (a model with linear-attention layers: scheduler/hybrid_cache.py): its
    # per-sequence state travels with the KV, at `num_tokens` (engine/contract/kv_blocks.py's "state" groups). -1: none.
    state_slot: int = -1


@dataclass
class KVTransferPlan:
    """A step's KV-connector work for its rank: loads run before the step's forward, saves after it (the KV the
    step writes is saved), both in the rank's stream order. `num_awaited`: transfers started by earlier steps and
    not reported yet (the engine keeps stepping, so the worker can report them)."""

    loads: list[KVTransfer] = field(default_factory=list)
    saves: list[KVTransfer] = field(default_factory=list)
    num_awaited: int = 0


@dataclass
class TokenLogprobs:
    """Log-probabilities for one sampled position (raw model distribution)."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class PromptLogprobs:
    """Prompt logprobs a step computed for one request (SamplingParams.prompt_logprobs): `entries[i]` scores prompt
    token `first_position + i` given the tokens before it (first_position >= 1: the first token has none)."""

    first_position: int
    entries: list[TokenLogprobs]


@dataclass
class RoutedExperts:
    """Routed expert ids a step recorded for one request (SamplingParams.return_routed_experts): `ids_PLK[i]` are
    the top-k logical expert ids of every MoE layer at position `first_position + i` (an int array [P, L, K])."""

    first_position: int
    ids_PLK: Any


@dataclass(frozen=True)
class StepStats:
    """What one rank measured in a step that ran model code; summed by the engine."""

    num_tokens: int  # tokens in the rank's flat batch (0: an empty rank that joined its peers' MoE layers)
    num_seqs: int
    step_s: float  # host wall-clock seconds of the step on this rank
    # The MoE layers' counters of the step (moe/stats.py MoECounters); None in a model without MoE layers.
    moe: Optional[MoEStepCounters] = None
    # Host seconds the rank waited for the device when it collected the step (overlapped loop: the part of
    # the device's time the host's own work did not cover).
    wait_s: float = 0.0
    # A multimodal model's vision tower in this step (engine/multimodal/): images it encoded, images its encoder
    # cache answered, and its seconds.
    images_encoded: int = 0
    encoder_cache_hits: int = 0
    encoder_s: float = 0.0


@dataclass
class ModelRunnerOutput:
    """What the worker sends back after a step.

    `sampled_token_ids[req_id]`: the request's new tokens in order, at least one. A step's sampling row emits one
    today; a step that verifies draft tokens (speculative decoding) emits the accepted ones and the token after
    them. The scheduler appends them one by one, checks the stop rules on each and drops those after the first
    that ends the request. Overlapped loop: a request whose later step is already in flight keeps only the first
    (that step was scheduled after one token and sampled its successor); the worker trims the same way, so both
    hold the same tokens (scheduler/step_output.py). `logprobs[req_id]`: one entry per token, for the requests
    that asked.
    """

    step_id: int
    # Only requests whose scheduled chunk reached their last token sample.
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # None when the rank ran no model code this step.
    stats: Optional[StepStats] = None
    # KV connector: transfer id -> True (done) / False (failed), for the transfers that ended since the rank's
    # last report; None without a connector or when none ended.
    kv_transfers_done: Optional[dict[int, bool]] = None
    # Speculative decoding: per request, the draft tokens the worker proposes for its next step (it verifies them
    # then); None without a drafter.
    draft_token_ids: Optional[dict[str, list[int]]] = None
    # Prompt logprobs of the prompt positions the step computed, for the requests that asked; None when none did.
    prompt_logprobs: Optional[dict[str, PromptLogprobs]] = None
    # Routed experts of the positions the step forwarded, for the requests that asked; None when none did.
    routed_experts: Optional[dict[str, RoutedExperts]] = None
