"""smg's output when the managed gateway keeps no log of it (no MOELINK_GATEWAY_LOG): read to its end, so a full
pipe never stalls smg, with only its last lines kept, so that a start smg refuses (an unknown parser name, a bad
flag) or never finishes (a gpt-oss worker whose Harmony encoding smg cannot load) is reported with smg's own
reason (`smg_refusal`) rather than a guess at a taken port or a bare timeout.
"""
from __future__ import annotations

import collections
import re
from typing import Optional

from ...contract.safe_text import shown

TAIL_LINES = 40  # of smg's output kept: its refusal is the last of them
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # smg colours its log lines
# smg's line for each HTTP request that failed: while smg is not ready that is the readiness probe's own, never
# the reason (seen: 'request failed with server error' after a gpt-oss worker's failed registration step).
REQUEST_LOG = "middleware/logging.rs"
SHOWN_CHARS = 700  # of smg's reason: a failed registration step's line runs to ~600 (its URL, its cause)


def keep_tail(stream, tail: collections.deque) -> None:
    """Read smg's output to its end (a full pipe would stall smg), keeping the last lines in `tail`
    but smg's per-request lines."""
    with stream:
        for raw in iter(stream.readline, b""):
            if REQUEST_LOG.encode() not in raw:  # the readiness probe's failures would push the reason out
                tail.append(raw)


def smg_refusal(tail) -> Optional[str]:
    """smg's own reason for exiting (or never getting ready), from its last output lines: the last one that
    names an error ('Error starting router: ...', a failed registration step, argparse's 'smg launch: error:
    ...', a Python exception's last line), uncoloured and shortened; None when it said none."""
    for raw in reversed(list(tail)):  # a copy: the reader thread may still append
        line = ANSI.sub("", raw.decode("utf-8", "replace")).strip()
        if "error" in line.lower() and not line.startswith(("File ", "Traceback")):
            return shown(line, limit=SHOWN_CHARS, quote=False)
    return None
