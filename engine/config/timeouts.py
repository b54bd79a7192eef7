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


DEFAULT_REJOIN_DELAY_S = 3.0  # after a rank loss, before a replacement is started (engine/cluster/rejoin.py)


def check_rejoin(ep_rejoin, delay_s, elastic_ep: bool, flag: str = "ep_rejoin") -> None:
    """The rejoin settings (ParallelConfig.ep_rejoin / ep_rejoin_delay_s), or one ValueError naming the field."""
    if ep_rejoin is not None and not isinstance(ep_rejoin, bool):
        raise ValueError(f"{flag}={ep_rejoin!r} is invalid: must be True, False or None (on with elastic_ep).")
    if ep_rejoin and not elastic_ep:
        raise ValueError(f"{flag}=True needs elastic_ep=True: a replacement rank rejoins a group that elastic EP kept "
                         "serving without the lost rank (drop --no-elastic-ep, or pass --no-ep-rejoin).")
    if isinstance(delay_s, bool) or not isinstance(delay_s, (int, float)) or not math.isfinite(delay_s) or delay_s < 0:
        raise ValueError(f"{flag}_delay_s={delay_s!r} is invalid: must be a finite number of seconds >= 0.")


# Joining a trainer's weight-update group (engine/rl/rank/weight_sync.py): the rendezvous at the trainer's address,
# which a trainer makes at the same time as it asks the engine to join, so seconds are plenty; the join runs on a
# thread of each rank, never the engine's, and the caller is answered by this bound even where torch's own store
# client ignores its timeout (a listener that accepts and never answers holds it until the listener closes).
DEFAULT_JOIN_TIMEOUT_S = 30.0
DEFAULT_GROUP_TIMEOUT_S = 60.0  # a trainer silent this long fails the tensor being received (and drops the group)
MAX_JOIN_TIMEOUT_S = 600.0
# A trainer's group's timeout (each broadcast a rank waits for): at most a day, so torch's timedelta never overflows.
MAX_GROUP_TIMEOUT_S = 86400.0


def check_bounded_seconds(name: str, value, most: float) -> None:
    """check_seconds, and at most `most`: one ValueError naming `name` and what is allowed."""
    check_seconds(name, value)
    if value > most:
        raise ValueError(f"{name}={value!r} is invalid: must be a positive number of seconds, at most {most:g}.")
