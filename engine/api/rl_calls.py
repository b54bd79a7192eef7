"""RL control calls on a served engine (docs/rl.md): `AsyncEngine.control` queues a `ControlCommand`, and the engine
thread runs it between two steps (`run_control`), the only thread that touches the core. An update therefore never
runs beside a step; requests that arrive meanwhile queue as commands behind it. Under pause_generation("wait") an
update (or sleep) waits for the started requests to end (`waits`) rather than being refused.
"""
from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Callable

# The calls a front end may make, and what each runs on the engine thread (`abort` ends requests the way the
# AsyncEngine does, through its output thread, before the engine pauses with nothing left to abort).
CONTROL_CALLS = ("update_weights_from_disk", "pause_generation", "continue_generation", "flush_cache",
                 "get_weight_version", "sleep", "wake_up", "init_weights_update_group",
                 "update_weights_from_distributed", "destroy_weights_update_group", "is_sleeping", "is_paused")


@dataclass(frozen=True)
class ControlCommand:
    """One control call for the engine thread; its result (or error) goes to `future`."""

    method: str
    args: tuple
    future: concurrent.futures.Future


# Calls that, under pause_generation("wait"), wait for the started requests to finish instead of being refused:
# a client pauses and asks for the update at once, and the update lands when the last started request has ended.
WAIT_FOR_STARTED = ("update_weights_from_disk", "update_weights_from_distributed", "sleep")


def waits(engine, cmd: ControlCommand) -> bool:
    """Whether `cmd` must wait (engine thread): paused in "wait" mode with started requests still running."""
    return cmd.method in WAIT_FOR_STARTED and engine.paused == "wait" and bool(engine.started_requests())


def check_call(method: str) -> None:
    if method not in CONTROL_CALLS:
        raise ValueError(f"control method={method!r} is invalid: choose from {', '.join(CONTROL_CALLS)}.")


def run_control(engine, cmd: ControlCommand, abort: Callable[[list[str]], int]) -> None:
    """Run `cmd` on `engine` (an LLMEngine, on its stepping thread); `abort(ids)` ends requests for pause's "abort"
    mode (the AsyncEngine's way, so their streams get final outputs) and returns how many it ended."""
    if not cmd.future.set_running_or_notify_cancel():
        return
    try:
        if cmd.method == "get_weight_version":
            result = engine.weight_version
        elif cmd.method == "pause_generation" and (cmd.args or ("abort",))[0] == "abort":
            engine._check_enabled("pause_generation")
            n = abort(engine.request_ids())
            result = {**engine.pause_generation("abort", *cmd.args[1:2]), "aborted": n}
        else:
            result = getattr(engine, cmd.method)(*cmd.args)
    except BaseException as exc:  # the caller's error (a refusal), delivered to it; the engine goes on
        cmd.future.set_exception(exc)
        return
    cmd.future.set_result(result)
