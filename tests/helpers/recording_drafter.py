"""A host drafter that records what each rank sees (tests/ep/test_tp_spec.py): importable by Ray ranks, which a test
module is not."""
from __future__ import annotations

import json
import os


class RecordingDrafter:
    """Appends the request states it is asked about (id, every token) to a file of its own process (one per rank),
    and drafts what the drafter `inner()` makes proposes (None: each request's last token k times). Module-level: a
    functools.partial of it pickles to Ray ranks."""

    def __init__(self, out_dir: str, inner=None):
        self.out_dir, self.inner = out_dir, inner() if inner is not None else None

    def propose(self, states, k: int) -> list[list[int]]:
        with open(os.path.join(self.out_dir, f"{os.getpid()}.jsonl"), "a") as f:
            for st in states:
                f.write(json.dumps([st.req_id, list(st.all_token_ids)]) + "\n")
        if self.inner is not None:
            return self.inner.propose(states, k)
        return [[st.all_token_ids[-1]] * k for st in states]
