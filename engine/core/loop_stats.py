"""Where the engine loop's time went, and the tokens its steps computed (LLMEngine.loop_stats).

Plain counters the stepping thread bumps and a scrape reads (engine/core/vllm_metrics.py): no lock, a reader
sees each count at most a step old.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# vLLM 0.32's buckets of `vllm:iteration_tokens_total` (vllm/v1/metrics/buckets.py ITERATION_TOKENS_BUCKETS).
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class LoopStats:
    """Where the engine loop's time went, summed since start (seconds, host clock): `launch_s` in launching
    steps (the ranks' host work when in process), `collect_s` in collecting them, of which `wait_s` the ranks
    spent waiting for their device (the device time the host's work did not cover)."""

    steps: int = 0
    launch_s: float = 0.0
    collect_s: float = 0.0
    wait_s: float = 0.0
    # The tokens each step computed, counted per bucket of ITERATION_TOKENS_BUCKETS (the last: past
    # them) and summed: vLLM's `vllm:iteration_tokens_total`, read at scrape time.
    step_tokens_counts: list[int] = field(default_factory=lambda: [0] * (len(ITERATION_TOKENS_BUCKETS) + 1))
    step_tokens_sum: int = 0

    def note_step_tokens(self, tokens: int) -> None:
        self.step_tokens_counts[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, tokens)] += 1
        self.step_tokens_sum += tokens
