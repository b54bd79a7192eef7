"""What the scheduler hands back to the engine after each step."""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Optional

from .outputs import RoutedExperts, TokenLogprobs
from .spec_decode import SpecDecodeCounters


@dataclass(slots=True)
class EngineCoreOutput:
    """New tokens (usually one) and, at the end, the finish reason of one request.

    The engine detokenizes `new_token_ids` and streams them; a non-None
    `finish_reason` ("stop" | "length" | "abort" | "error") is the last output
    of that request. `stop_reason` is the stop token id that ended it (None for
    EOS or length; the error's message for an "error" that has one). `num_cached_tokens` is the
    prefix-cache hit of its first schedule, for usage reporting.
    """

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: Sequence[TokenLogprobs] = field(default_factory=list)  # read only (may be a shared empty tuple)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # with finish_reason "error": the error (engine/lora/admission.py)
    num_cached_tokens: int = 0
    # A finished request's KV-connector parameters for the engine that continues it (a prefill engine's: where a
    # decode engine loads its saved KV; scheduler/kv_connector.py `request_finished`); None without.
    kv_transfer_params: Any = None
    # The first output of a request that asked for prompt logprobs: one per prompt token after the first.
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None
    # Routed experts recorded since the request's last output (scheduler/outputs.RoutedExperts, in step order).
    routed_experts: Optional[list[RoutedExperts]] = None
    # The weight version (LLMEngine.rl.weight_version) of the weights that computed these tokens, set by the engine;
    # and, only for a request an update reached while it was held (pause_generation("keep")), the versions its
    # earlier KV and tokens came from, oldest first.
    weight_version: Optional[str] = None
    earlier_weight_versions: Optional[tuple] = None
    # A finished request's (first scheduled time, preemptions): Request.first_scheduled_time and num_preemptions, for
    # vLLM's per-request phase metrics (engine/core/vllm_metrics.py); None on the outputs before.
    timing: Optional[tuple[Optional[float], int]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SchedulerStats:
    """A snapshot of one scheduler, for metrics and the data-parallel router."""

    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks held by requests
    num_free_blocks: int  # ref-0 blocks, including cached ones that can be evicted
    num_total_blocks: int
    prefix_cache_queries: int  # tokens looked up, cumulative
    prefix_cache_hits: int  # tokens found, cumulative
    num_preemptions_total: int
    # Speculative decoding's counters (scheduler/spec_decode.py); None until a step verified drafts.
    spec_decode: Optional[SpecDecodeCounters] = None
    # A KV connector's (scheduler/kv_connector.py: prefill/decode disaggregation); None without one.
    kv_transfer: Optional["KVTransferCounters"] = None

    @classmethod
    def combine(cls, per_rank: "list[SchedulerStats]") -> "SchedulerStats":
        """Several ranks' schedulers as one: sums, and kv_usage over the pooled blocks."""
        if len(per_rank) == 1:
            return per_rank[0]
        total = sum(s.num_total_blocks for s in per_rank)
        return cls(
            num_running=sum(s.num_running for s in per_rank), num_waiting=sum(s.num_waiting for s in per_rank),
            kv_usage=sum(s.kv_usage * s.num_total_blocks for s in per_rank) / total,
            num_free_blocks=sum(s.num_free_blocks for s in per_rank), num_total_blocks=total,
            prefix_cache_queries=sum(s.prefix_cache_queries for s in per_rank),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in per_rank),
            num_preemptions_total=sum(s.num_preemptions_total for s in per_rank),
            spec_decode=_combined_spec([s.spec_decode for s in per_rank]),
            kv_transfer=KVTransferCounters.combine([s.kv_transfer for s in per_rank]),
        )

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass
class KVTransferCounters:
    """A KV connector's handoffs as the scheduler sees them, cumulative (metrics: moelink_kv_transfer_*)."""

    loads_ok: int = 0  # requests whose prompt KV was loaded
    loads_failed: int = 0  # loads that failed or timed out (the request was recomputed)
    tokens_loaded: int = 0  # prompt tokens of the successful loads
    load_wait_s: float = 0.0  # summed seconds from a load's start (blocks reserved) to its report, ok or failed
    saves: int = 0  # requests whose finished output said where their saved KV is (a prefill engine's handoffs)
    holds_read: int = 0  # saves held in the cache (NIXL) whose hold ended with a fetch claiming them
    holds_unread: int = 0  # held saves released unread: expired, or evicted for newer holds past their bounds
    held_blocks: int = 0  # a gauge: KV blocks held by saves now (not cumulative)

    @classmethod
    def combine(cls, per_rank: "list[KVTransferCounters | None]") -> "KVTransferCounters | None":
        ranks = [c for c in per_rank if c is not None]
        if not ranks:
            return None
        return cls(**{f: sum(getattr(c, f) for c in ranks) for f in
                      ("loads_ok", "loads_failed", "tokens_loaded", "load_wait_s", "saves", "holds_read",
                       "holds_unread", "held_blocks")})


def _combined_spec(per_rank: "list[SpecDecodeCounters | None]") -> "SpecDecodeCounters | None":
    ranks = [c for c in per_rank if c is not None]
    if not ranks:
        return None
    total = SpecDecodeCounters()
    for c in ranks:
        total.add(c)
    return total
