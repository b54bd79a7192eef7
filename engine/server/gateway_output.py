"""smg's output when the managed gateway keeps no log of it (no MOELINK_GATEWAY_LOG): read to its end, so a full
pipe never stalls smg, with only its last lines kept, so that a start smg refuses (an unknown parser name, a bad
flag) is reported with smg's own reason (`smg_refusal`) rather than a guess at a taken port.
"""
from __future__ import annotations

import collections
import re
from typing import Optional

from ..contract.safe_text import shown

TAIL_LINES = 40  # of smg's output kept: its refusal is the last of them
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # smg colours its log lines


def keep_tail(stream, tail: collections.deque) -> None:
    """Read smg's output to its end (a full pipe would stall smg), keeping the last lines in `tail`."""
    with stream:
        for raw in iter(stream.readline, b""):
            tail.append(raw)


def smg_refusal(tail) -> Optional[str]:
    """smg's own reason for exiting, from its last output lines: the last one that names an error ('Error
    starting router: ...', argparse's 'smg launch: error: ...', a Python exception's last line), uncoloured and
    shortened; None when it said none."""
    for raw in reversed(tail):
        line = ANSI.sub("", raw.decode("utf-8", "replace")).strip()
        if "error" in line.lower() and not line.startswith(("File ", "Traceback")):
            return shown(line, limit=400, quote=False)
    return None
