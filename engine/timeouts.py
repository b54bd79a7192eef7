"""Watchdog defaults of a multi-rank engine (no torch here: the CLI imports this for its help text)."""
from __future__ import annotations

import math

# A decode step takes milliseconds and a prefill chunk of max_num_batched_tokens (8192) a few seconds
# even on the largest models we run, so 2 minutes only ever trips on a hang; it is twice
# comm_timeout_s, so a collective waiting on a lost peer fails first, naming its rank.
DEFAULT_STEP_TIMEOUT_S = 120.0
# The first model step compiles the Triton prefill and MoE kernels (decode kernels compile while
# CUDA graphs are captured, at load): a cold compile cache can take minutes there.
FIRST_STEP_TIMEOUT_S = 600.0
# A rank answers heartbeats on its own thread, also in the middle of a step or a compile: 10 s of
# silence means a frozen (SIGSTOP, D state), wedged or unreachable process.
DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0


def check_seconds(name: str, value) -> None:
    """A positive, finite number of seconds, or ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: must be a positive number of seconds.")
