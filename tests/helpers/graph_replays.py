"""The CPU stand-in tests of decode graphs: a capture backend that records without running, and a count of how often
each captured size serves a step."""
from __future__ import annotations

from moelink.engine.rank.cuda_graph import CapturedStep, EagerReplay


class Replay(EagerReplay):
    """EagerReplay whose capture records the forward without running it, as a real capture runs no kernel:
    capture_all's warm-up has just run the same forward on the same static buffers and its check replay runs it
    again, so the stand-in's third run per size checked nothing more (and each is seconds in the interpreter).
    Nor does the check replay itself, here: on a GPU it runs the *graph* (can it replay?), but the stand-in's replay
    is the warm-up's own call again, on the same buffers, so the first replay after the capture (capture_all's check,
    the only caller that replays at once) returns at once; every later replay runs the forward."""

    def capture(self, fn):
        return _Recorded(fn)


class _Recorded(CapturedStep):
    """A recorded forward whose first replay (capture_all's check, right after the warm-up ran `fn`) is skipped."""

    def __init__(self, fn):
        self.checked = False
        self.forward = fn
        super().__init__(self._replay)

    def _replay(self):
        if not self.checked:
            self.checked = True
            return None
        return self.forward()


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
