"""What start-up warm-up runs: the shapes of the synthetic steps, chosen so that every compiled variant a real
step can hit is compiled before the engine serves (engine/rank/warmup.py runs them). Pure functions of the limits.

A Triton kernel compiles once per set of compile-time values, and besides its constexprs Triton specialises
every integer argument on `== 1` and `% 16 == 0`. What a step's kernels derive from its shape:
- the token count T (norms, rotary, KV write, FP8 activation quantization, the dense FP8 GEMM's bucket):
  through next_power_of_2(T), T == 1 and T % 16. The prefill sweep takes, in each power-of-two range
  (2^(j-1), 2^j] up to max_num_batched_tokens, its first token count (odd) and its multiple of 16;
- the sequence count S of a prefill (paged attention's prefill kernel specialises on it): 1, 3 and 16;
- the block-table width M (the step's widest sequence in blocks: the attention kernels specialise on the
  table's row stride): 1, 3 and 16 blocks, on every attention path;
- paged attention's paths: prefill, decode (split or not: a function of S and the SMs), a mixed batch (the
  prefill kernel skipping the decode rows), and chunked prefill over a long cached prefix (split-K with a
  merge whose block follows the split count: prefixes of 1024 * 2^j tokens);
- the fused MoE's variants (launch-config buckets, tiny path, alignment sizes): planned apart, exhaustively
  for every token count, by kernels/moe_variants.py, and run as direct expert calls (engine/rank/warmup.py).
Decode batches that replay a CUDA graph were compiled and run at capture (engine/rank/cuda_graph.py): only decode
sizes the graphs do not cover are planned. The reference kernels compile nothing: `minimal_plan` is one
small step (a prefill and a decode side by side) that exercises the warm-up path itself.

Legend: T tokens of a step, S sequences, M block-table width, B max_num_batched_tokens, L max_model_len.
"""
from __future__ import annotations

from dataclasses import dataclass

PREFILL, CHUNKED, DECODE, MIXED = "prefill", "chunked prefill", "decode", "mixed"
PHASES = (PREFILL, CHUNKED, DECODE, MIXED)
# Cached prefixes the chunked-prefill steps attend over: the prefill split count grows with the prefix (about
# one split per 128 keys, at most 32), so these reach each block size of the split merge.
PREFIXES = (1024, 2048, 4096, 8192, 16384, 32768)
CHUNKS = (16, 256)  # chunk sizes after such a prefix: a chunk's tail, and a chunk of many query blocks
DECODE_CONTEXT = 64  # the minimal plan's decoding sequence: tokens it has seen


@dataclass(frozen=True)
class SeqShape:
    """One sequence of a warm-up step: `cached` tokens already in its (null) cache, `new` computed now."""

    cached: int
    new: int


@dataclass(frozen=True)
class WarmupStep:
    phase: str
    seqs: tuple[SeqShape, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.new for s in self.seqs)

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def is_decode(self) -> bool:
        return all(s.new == 1 for s in self.seqs)


@dataclass(frozen=True)
class StepLimits:
    """The shapes a real step can take on one rank, and what CUDA graphs already cover.

    `graph_max`: the largest decode batch that replays a graph (0: every decode step runs eagerly)."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    block_size: int = 16
    graph_max: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"StepLimits.{name}={v!r} is invalid: must be a positive integer.")
        if isinstance(self.graph_max, bool) or not isinstance(self.graph_max, int) or self.graph_max < 0:
            raise ValueError(f"StepLimits.graph_max={self.graph_max!r} is invalid: must be an integer >= 0.")

    def table_lengths(self) -> list[int]:
        """Sequence lengths whose block tables are 1, 3 and 16 blocks wide (those that fit): the attention
        kernels specialise on the table's row stride, the step's widest table."""
        bs, L = self.block_size, self.max_model_len
        return sorted({n for n in (bs, 2 * bs + 1, 16 * bs) if n <= L} or {L})


def token_sweep(max_tokens: int) -> list[int]:
    """Prefill token counts >= 2: in each power-of-two range (2^(j-1), 2^j] up to `max_tokens`, the first
    count, the last and the largest multiple of 16 (module docstring); and `max_tokens` itself."""
    counts = {max_tokens}
    hi = 2
    while hi // 2 < max_tokens:
        top = min(hi, max_tokens)
        counts |= {hi // 2 + 1, top, top // 16 * 16}
        hi *= 2
    return sorted(c for c in counts if 2 <= c <= max_tokens)


def _prefill(total: int, lim: StepLimits) -> WarmupStep | None:
    """`total` prompt tokens as few sequences of at most L tokens each, or None when they cannot be one step."""
    L = lim.max_model_len
    n = -(-total // L)
    if n > lim.max_num_seqs or total > lim.max_num_batched_tokens:
        return None
    sizes = [total // n + (i < total % n) for i in range(n)]
    return WarmupStep(PREFILL, tuple(SeqShape(0, q) for q in sizes))


def plan_steps(lim: StepLimits) -> list[WarmupStep]:
    """The steps of a full warm-up (the Triton kernels), in phase order; each fits the limits."""
    B, S, L = lim.max_num_batched_tokens, lim.max_num_seqs, lim.max_model_len
    lengths = lim.table_lengths()
    steps: list[WarmupStep] = []
    for t in token_sweep(B):
        step = _prefill(t, lim)
        if step is not None:
            steps.append(step)
    # Short prompt chunks of 1, 3 and 16 sequences (the prefill kernel specialises on the count), each at every
    # table width: two new tokens after a cached prefix.
    for n in (1, 3, 16):
        for length in lengths:
            if n <= S and 2 * n <= B and length >= 2:
                steps.append(WarmupStep(PREFILL, tuple(SeqShape(length - 2, 2) for _ in range(n))))
    for q in CHUNKS:
        for p in PREFIXES:
            # After the prefix and ending on a 16-block boundary: both row strides of these wide tables.
            for prefix in {p, p - q} if p > PREFIXES[0] else {p}:
                if q <= B and prefix + q <= L:
                    steps.append(WarmupStep(CHUNKED, (SeqShape(prefix, q),)))
    # Decode sizes that run eagerly (all without graphs, else those above the largest graph) at every width.
    sizes = {1, 3, 16, S} if lim.graph_max == 0 else {lim.graph_max + 1, S}
    for n in sorted(sizes):
        if lim.graph_max < n <= min(S, B):
            steps += [WarmupStep(DECODE, tuple(SeqShape(length - 1, 1) for _ in range(n))) for length in lengths]
    # A prompt chunk beside decoding sequences, at every width: two sequences, sixteen (a new request among 15
    # streams), and the most a step holds (its decode rows then fill the SMs: the decode kernel does not split).
    for total in sorted({2, 16, min(S, B - 1)}):
        for length in lengths:
            q = min(17, length, B - (total - 1))
            if 2 <= total <= S and q >= 2:
                steps.append(WarmupStep(MIXED, tuple(SeqShape(length - 1, 1) for _ in range(total - 1))
                                        + (SeqShape(0, q),)))
    return steps


def minimal_plan(lim: StepLimits) -> list[WarmupStep]:
    """One small step for kernels that compile nothing (the references): a short prompt beside a decoding
    sequence when the limits allow two, else the prompt alone (a single token when nothing more fits)."""
    q = max(1, min(4, lim.max_model_len, lim.max_num_batched_tokens - 1))
    seqs = [SeqShape(0, q)]
    if lim.max_num_seqs >= 2 and lim.max_num_batched_tokens >= q + 1 and lim.max_model_len >= 2:
        seqs.append(SeqShape(min(DECODE_CONTEXT, lim.max_model_len - 1), 1))
    return [WarmupStep(MIXED if len(seqs) > 1 else PREFILL, tuple(seqs))]


__all__ = ["CHUNKED", "DECODE", "MIXED", "PHASES", "PREFILL", "SeqShape", "StepLimits", "WarmupStep", "minimal_plan",
           "plan_steps", "token_sweep"]
