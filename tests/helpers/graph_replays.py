"""Count how often each captured decode-graph size serves a step (the CPU stand-in tests of decode graphs)."""
from __future__ import annotations


def count_replays(graphs, verify: bool = False) -> dict[int, int]:
    """Wrap every captured step of `graphs` (engine.cuda_graph.DecodeGraphs; its verify graphs with `verify`) so
    its replays are counted; returns the live {batch size: replays} dict, all zero now."""
    steps = graphs.verify_steps if verify else graphs.steps
    replays = {b: 0 for b in steps}
    for b, step in steps.items():
        inner = step.replay

        def counting(inner=inner, b=b):
            replays[b] += 1
            return inner()

        step.replay = counting
    return replays
