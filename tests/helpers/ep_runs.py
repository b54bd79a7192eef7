"""Runs of the tiny Qwen3-MoE that several EP test modules compare against, made once per test process.

An EP engine start costs every rank a process that imports torch and builds the model (seconds of CPU each on the
2-core machines). tests/ep/test_ep_ray.py's EP 4 run on the one-level "torch" all-to-all (the default at EP > 1) is
also the dispatch-byte reference of tests/ep/test_ep_two_level.py: same checkpoint, prompts and engine settings, so
the run is made once per process (`make test` puts every Ray test on one xdist worker) and what both check is kept:
its tokens, its MoE counters, whether every pool was free after it. The one-rank reference is kept the same way.
"""
from __future__ import annotations

import dataclasses
import random

ENGINE_KW = dict(dtype="float64", max_num_seqs=8, max_num_batched_tokens=48, num_kv_blocks=128, block_size=16)
MAX_NEW = 5


def prompts(vocab: int, seed: int = 2, n: int = 6, hi: int = 100) -> list[list[int]]:
    """n random prompts: the first 1 token, the second `hi` (prefills chunked under the 48-token budget), the rest
    in between (ragged batches)."""
    rng = random.Random(seed)
    lens = [1, hi] + [rng.randint(1, hi) for _ in range(n - 2)]
    return [[rng.randrange(vocab) for _ in range(L)] for L in lens]


def greedy(llm, ps: list[list[int]], max_new: int = MAX_NEW) -> list[list[int]]:
    from moelink.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)]


_ONE_RANK: dict[str, tuple[list[list[int]], list[list[int]]]] = {}


def one_rank(path: str, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts(vocab), one in-process rank's greedy tokens for them) for the checkpoint at `path`."""
    from moelink.engine import LLM

    if path not in _ONE_RANK:
        ps = prompts(vocab)
        _ONE_RANK[path] = ps, greedy(LLM(path, **ENGINE_KW), ps)
    return _ONE_RANK[path]


@dataclasses.dataclass(frozen=True)
class EPRun:
    """What an EP run of one_rank's prompts gave: tokens, the engine's MoE counters, and whether every rank's KV
    pool was free again after it."""

    tokens: list[list[int]]
    total_routed: int
    bytes_dispatched: int
    bytes_combined: int
    pools_free: bool


_EP_RUNS: dict[tuple, EPRun] = {}


def ep_run(path: str, vocab: int, ep: int, all_to_all: str = "auto") -> EPRun:
    """one_rank's prompts on `ep` ranks (the local Ray this process is connected to) with ENGINE_KW; one engine per
    (checkpoint, ep, resolved backend) per process ("auto" is "torch" at EP > 1: comm/backends.resolve_backend)."""
    from moelink.comm.backends import resolve_backend
    from moelink.engine import LLM

    key = (path, ep, resolve_backend(all_to_all, ep).name)
    if key not in _EP_RUNS:
        ps, _ = one_rank(path, vocab)
        llm = LLM(path, expert_parallel_size=ep, all_to_all=all_to_all, **ENGINE_KW)
        try:
            tokens = greedy(llm, ps)
            m = llm.engine.moe_metrics
            free = all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
            _EP_RUNS[key] = EPRun(tokens, m.total_routed(), m.bytes_dispatched, m.bytes_combined, free)
        finally:
            llm.engine.shutdown()
    return _EP_RUNS[key]
