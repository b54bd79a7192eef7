"""Plain dataclasses that cross the scheduler ↔ worker boundary (DESIGN.md: Interfaces).

Nothing here imports torch: these objects are pickled to Ray workers and back,
so they hold only Python ints, strings, lists and dicts.

A step is described *incrementally*: a request is sent in full once
(`NewRequestData`) and afterwards only by what changed (`CachedRequestData`).
The worker keeps each request's token ids and block table between steps and
appends the tokens it samples itself, exactly as the scheduler does, so both
sides agree on `all_token_ids` without shipping them every step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class NewRequestData:
    """A request the worker has not seen (or has dropped after a preemption)."""

    req_id: str
    prompt_token_ids: list[int]
    # Tokens generated before a preemption: recomputed like prompt tokens, but
    # they count as output for penalties and stop checks.
    output_token_ids: list[int]
    # Opaque to the scheduler: the engine's SamplingParams (a plain dataclass).
    sampling_params: Any
    block_ids: list[int]
    # Tokens whose KV is already in `block_ids` (prefix-cache hits).
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the worker already holds: only its new blocks and progress."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


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

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class TokenLogprobs:
    """Log-probabilities for one sampled position (raw model distribution)."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class ModelRunnerOutput:
    """What the worker sends back after a step."""

    step_id: int
    # Only requests whose scheduled chunk reached their last token sample.
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # Free-form per-step counters (timings, expert load), summed by the engine.
    stats: dict[str, Any] = field(default_factory=dict)
