"""The CPU stand-in tests of decode graphs: a capture backend that records without running, and a count of how often
each captured size serves a step."""
from __future__ import annotations

from moelink.engine.rank.cuda_graph import CapturedStep, EagerReplay


class Replay(EagerReplay):
    """EagerReplay whose capture records the forward without running it, as a real capture runs no kernel:
    capture_all's warm-up has just run the same forward on the same static buffers and its check replay runs it
    again, so the stand-in's third run per size checked nothing more (and each is seconds in the interpreter)."""

    def capture(self, fn):
        return CapturedStep(fn)


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
