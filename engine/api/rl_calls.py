"""RL control calls on a served engine (docs/rl.md): `AsyncEngine.control` queues a `ControlCommand`, and the engine
thread runs it between two steps (`run_control`), the only thread that touches the core. An update therefore never
runs beside a step; requests that arrive meanwhile queue as commands behind it. Under pause_generation("wait") an
update (or sleep) waits for the started requests to end (`waits`) rather than being refused.

What a call's arguments make costly never runs on the engine thread (`drive`): the reads (`READ_ONLY_CALLS`) are
answered at once from the caller's side, also while an update waits or runs; an update from disk reads and checks
the new checkpoint's headers on a thread of its own (engine/rl/control.RLControl.check_disk_update) and only the
ranks' write runs between two steps; a join of a trainer's group is begun on every rank (each on a thread of its own)
and polled between steps until it is done, failed, or past its join_timeout_s, so steps run on while a trainer's
address keeps the rendezvous waiting. Each call is the engine's RL control's (`engine.rl`, engine/rl/control.py) or
its memory control's (`engine.rl.memory`: MEMORY_CALLS).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Any, Callable

# The calls a front end may make, and what each runs on the engine thread (`abort` ends requests the way the
# AsyncEngine does, through its output thread, before the engine pauses with nothing left to abort).
CONTROL_CALLS = ("update_weights_from_disk", "pause_generation", "continue_generation", "flush_cache",
                 "get_weight_version", "sleep", "wake_up", "init_weights_update_group",
                 "update_weights_from_distributed", "destroy_weights_update_group", "is_sleeping", "is_paused",
                 "update_weights_from_tensor")
# Calls that only read one attribute the engine thread writes between two steps: answered on the caller's thread,
# never queued behind an update that waits for started requests (or one that runs).
READ_ONLY_CALLS = ("get_weight_version", "is_sleeping", "is_paused")
# The calls the engine's memory control answers (engine.rl.memory, engine/rl/memory.py); the others are engine.rl's
# own (engine/rl/control.py).
MEMORY_CALLS = ("sleep", "wake_up", "is_sleeping")
# Between two polls of a pending join, at first and at most (a join on loopback takes a few milliseconds).
JOIN_POLL_S = (0.01, 0.2)


@dataclass(frozen=True)
class ControlCommand:
    """One control call for the engine thread; its result (or error) goes to `future`. `call`: the engine method
    run (None: `method` itself); `ordered=False`: run even while earlier calls wait (a begun join's polls and its
    drop, which change nothing an earlier call depends on)."""

    method: str
    args: tuple
    future: concurrent.futures.Future
    call: str | None = None
    ordered: bool = True


# Calls that, under pause_generation("wait"), wait for the started requests to finish instead of being refused:
# a client pauses and asks for the update at once, and the update lands when the last started request has ended.
WAIT_FOR_STARTED = ("update_weights_from_disk", "update_weights_from_distributed", "update_weights_from_tensor",
                    "sleep")


def waits(engine, cmd: ControlCommand) -> bool:
    """Whether `cmd` must wait (engine thread): paused in "wait" mode with started requests still running."""
    return cmd.method in WAIT_FOR_STARTED and engine.rl.paused == "wait" and bool(engine.rl.started_requests())


def check_call(method: str) -> None:
    if method not in CONTROL_CALLS:
        raise ValueError(f"control method={method!r} is invalid: choose from {', '.join(CONTROL_CALLS)}.")


def read_now(engine, method: str):
    """A read-only call's answer (any thread): one attribute the engine thread writes between two steps, so the
    answer is the state before or after a call, never half of one."""
    if method == "get_weight_version":
        return engine.rl.weight_version
    if method == "is_sleeping":
        return engine.rl.memory.is_sleeping()
    return engine.rl.is_paused()


def bound(engine, name: str) -> Callable:
    """The engine's RL call of that name: its memory control's for MEMORY_CALLS, its RL control's otherwise."""
    return getattr(engine.rl.memory if name in MEMORY_CALLS else engine.rl, name)


# submit(method, args, call, ordered): queue a ControlCommand for the engine thread now; the future of its result.
Submit = Callable[[str, tuple, "str | None", bool], "asyncio.Future[Any]"]


async def drive(engine, method: str, args: tuple, submit: Submit, checks: concurrent.futures.Executor):
    """Run one control call of a served engine (AsyncEngine.control): reads at once, an update from disk checked on
    `checks` (a thread of the engine's own) before its write is queued, a join begun then polled; anything else
    queued as it is."""
    if method in READ_ONLY_CALLS:
        return read_now(engine, method)
    if method == "update_weights_from_disk":
        loop = asyncio.get_running_loop()
        checked = await loop.run_in_executor(checks, lambda: engine.rl.check_disk_update(*args))
        return await submit(method, (checked,), "apply_disk_update", True)
    if method == "init_weights_update_group":
        join = await submit(method, args, "begin_weights_update_group", True)
        delay = JOIN_POLL_S[0]
        try:
            while True:
                await asyncio.sleep(delay)
                delay = min(2 * delay, JOIN_POLL_S[1])
                done = await submit(method, (join,), "poll_weights_update_group", False)
                if done is not None:
                    return done
        except asyncio.CancelledError:  # the caller left: no rank keeps a join nobody waits for
            try:
                dropped = submit(method, (join,), "abandon_weights_update_group", False)
            except Exception:  # the engine stopped: its ranks went with it
                raise asyncio.CancelledError() from None
            dropped.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it
            raise
    return await submit(method, args, None, True)


def run_control(engine, cmd: ControlCommand, abort: Callable[[list[str]], int]) -> None:
    """Run `cmd` on `engine` (an LLMEngine, on its stepping thread); `abort(ids)` ends requests for pause's "abort"
    mode (the AsyncEngine's way, so their streams get final outputs) and returns how many it ended."""
    if not cmd.future.set_running_or_notify_cancel():
        return
    try:
        if cmd.call is not None:
            result = bound(engine, cmd.call)(*cmd.args)
        elif cmd.method in READ_ONLY_CALLS:
            result = read_now(engine, cmd.method)
        elif cmd.method == "pause_generation" and (cmd.args or ("abort",))[0] == "abort":
            engine.rl.check_enabled("pause_generation")
            n = abort(engine.request_ids())
            result = {**engine.rl.pause_generation("abort", *cmd.args[1:2]), "aborted": n}
        else:
            result = bound(engine, cmd.method)(*cmd.args)
    except BaseException as exc:  # the caller's error (a refusal), delivered to it; the engine goes on
        cmd.future.set_exception(exc)
        return
    cmd.future.set_result(result)
