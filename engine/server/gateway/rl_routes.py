"""The RL control calls on the HTTP port, by SGLang's route names (and vLLM's where it has one), answered from the
engine beside the front (docs/rl.md#over-http).

verl, slime and the other rollout drivers call a generator's HTTP port: `POST /update_weights_from_disk`,
`/init_weights_update_group`, `/update_weights_from_distributed`, `/destroy_weights_update_group`,
`/pause_generation`, `/continue_generation`, `/flush_cache`, `/release_memory_occupation`,
`/resume_memory_occupation`, `GET /get_weight_version` (SGLang's), and vLLM's `POST /sleep`, `/wake_up`,
`/reset_prefix_cache`, `/pause`, `/resume`, `GET /is_sleeping`, `/is_paused`. Each runs the same call as the gRPC
Control service (control.py) and the Python API: `AsyncEngine.control`, on the engine thread between two steps. smg's
RL control plane (smg's `--enable-rl`, `/v1/rl/engine/{path}?selector=...`) fans these out to moelink's front
registered as an HTTP worker (it sees a vLLM engine).

Who may call: like every route of the port but the probes, the API key where one is set (the front checks it);
beyond that, every route but the three that read (`/get_weight_version`, `/is_sleeping`, `/is_paused`) is refused
unless the server was started with `--enable-weight-updates` (403 naming the flag): the flush too, which would let any
client empty every user's prefix cache. A body is a JSON object of the call's fields as SGLang names them; a field
the call does not take is refused (400 naming it), never ignored. vLLM's `/sleep?level=N`, `/wake_up?tags=...` and
`/pause?mode=...&clear_cache=...` take their query string too. Answers: SGLang's `{"success", "message"}` (with the
call's numbers beside them), 400 with `success: false` for a refused call, 503 when the engine has stopped.

What slime, verl and AReaL send beside (issue 97; docs/rl.md#slime-verl-and-areal-sglangs-clients): GET /flush_cache
(and GET release / resume, as SGLang routes them); `flush_cache: false` on an update, honoured (the flush deferred to
the caller's own or the next admission: engine/rl/control.py); `abort_all_requests` on an update (every running
request aborted first); `master_port` as a string of digits; `load_format` at its default; release `tags` naming both
the weights and the KV cache; AReaL's `pp_rank` 0; `/update_weights_from_tensor` in SGLang's serialization of CPU
tensors (engine/rl/serialized_tensors.py: allow-listed unpickling off the loop; CUDA IPC handles refused naming the
field); `/post_process_weights` (nothing to do here); `/weights_checker` and slime's `/pull_weights` refused naming
why. Anything else a call does not take is still refused naming it.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import parse_qs

from ...config.timeouts import DEFAULT_GROUP_TIMEOUT_S, DEFAULT_JOIN_TIMEOUT_S
from ...contract.safe_text import shown
from .http_wire import error_object
from .json_body import off_loop


@dataclass(frozen=True)
class Route:
    """One control route: its HTTP method, the engine call, the body fields it takes (SGLang's names) and how they
    become the call's arguments."""

    method: bytes
    call: str
    fields: tuple[str, ...]
    args: Callable[[dict], tuple]
    answer: Callable[[Any], dict]
    also: tuple[bytes, ...] = ()  # other methods taken (SGLang's /flush_cache: GET or POST)


def _ok(message: str) -> Callable[[Any], dict]:
    def answer(result: Any) -> dict:
        extra = result if isinstance(result, dict) else {}
        return {"success": True, "message": extra.get("message", message), **extra}
    return answer


def _str(data: dict, name: str, required: bool = False) -> Optional[str]:
    v = data.get(name)
    if v is None:
        if required:
            raise _Refused(f"{name} is required (a string).", name)
        return None
    if not isinstance(v, str):
        raise _Refused(f"{name}={shown(repr(v))} is invalid: must be a string.", name)
    return v


def _int(data: dict, name: str, default: Optional[int] = None) -> int:
    v = data.get(name, default)
    if v is None or isinstance(v, bool) or not isinstance(v, int):
        raise _Refused(f"{name}={shown(repr(v))} is invalid: must be an integer.", name)
    return v


def _version(data: dict) -> Optional[str]:
    """weight_version: a bounded label (it is echoed with every user's outputs), refused here naming the field."""
    from ...contract.weight_sync import check_weight_version

    v = _str(data, "weight_version")
    try:
        check_weight_version(v)
    except ValueError as e:
        raise _Refused(str(e), "weight_version") from None
    return v


def _port(data: dict, name: str) -> int:
    """A port: an integer, or its decimal digits as a string (SGLang's pydantic model coerces "29500"; AReaL sends
    the port as a string)."""
    v = data.get(name)
    if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 5:
        return int(v)
    return _int(data, name)


def _load_format(data: dict, name: str = "load_format", taken: tuple = (None, "auto")) -> Optional[str]:
    """load_format: SGLang's default (none, "auto") or one this route takes; another refused naming it."""
    v = _str(data, name)
    if v not in taken:
        raise _Refused(f"{name}={shown(repr(v))} is invalid here: choose from "
                       f"{', '.join(repr(t) for t in taken if t is not None)} or leave it out.", name)
    return v


def _pp_rank(data: dict) -> None:
    """AReaL's pp_rank (its per-pipeline-stage groups): this engine runs no pipeline stages, so only stage 0."""
    if _int(data, "pp_rank", 0) != 0:
        raise _Refused(f"pp_rank={shown(repr(data['pp_rank']))} is invalid: this server runs one pipeline stage (0); "
                       "join the group of stage 0.", "pp_rank")


def _group_args(data: dict) -> tuple:
    _pp_rank(data)
    return (_str(data, "master_address", True), _port(data, "master_port"), _int(data, "rank_offset"),
            _int(data, "world_size"), _str(data, "group_name") or _GROUP, _str(data, "backend") or "gloo",
            DEFAULT_GROUP_TIMEOUT_S, _seconds(data, "join_timeout_s", DEFAULT_JOIN_TIMEOUT_S))


def _tensor_args(data: dict) -> tuple:
    """update_weights_from_tensor's fields (SGLang's): serialized_named_tensors (one base64 entry per TP rank of
    the sender; decoded off the loop by the route, engine/rl/serialized_tensors.py), load_format (none or
    "flattened_bucket"), flush_cache, weight_version."""
    entries = data.get("serialized_named_tensors")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        raise _Refused("serialized_named_tensors is required: a non-empty list of base64 strings (SGLang's "
                       "MultiprocessingSerializer.serialize(..., output_str=True), one per TP rank).",
                       "serialized_named_tensors")
    return (entries, _load_format(data, taken=(None, "auto", "flattened_bucket")), _bool(data, "flush_cache", True),
            _version(data))


_CHECKER_ACTIONS = ("snapshot", "reset_tensors", "compare", "compare_checksum")


def _checker(data: dict) -> tuple:
    action = _str(data, "action", True)
    raise _Refused(f"action={shown(repr(action))} is not served: /weights_checker is SGLang's debugging check "
                   f"({', '.join(_CHECKER_ACTIONS)}: snapshot the weights, overwrite them with noise, compare after "
                   "the trainer's update); moelink checks every update against the served checkpoint before any "
                   "rank writes, and a failed one is rolled back. Run without the check (slime: leave "
                   "--check-weight-update-equal off).", "action")


def _post_process(data: dict) -> tuple:
    """SGLang's post_process_weights (slime's compressed-tensors hooks): restore the loader's layout before an update
    and re-quantize after it. Here each rank quantizes a float tensor as it writes it (engine/rl/requantize.py), so
    the weights are in their served form after every update: both steps have nothing to do."""
    _bool(data, "restore_weights_before_load", False)
    _bool(data, "post_process_quantization", False)
    return ()


def _pull(data: dict) -> tuple:
    raise _Refused("/pull_weights is refused: it is slime's patch of SGLang (each host copies a published "
                   "checkpoint into its local directory), not SGLang's; copy the checkpoint where this server reads "
                   "it, then call /update_weights_from_disk with its model_path.", None)


def _seconds(data: dict, name: str, default: float) -> float:
    """A number of seconds (the engine checks its range, naming the field)."""
    v = data.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Refused(f"{name}={shown(repr(v))} is invalid: must be a number of seconds.", name)
    return v


def _opt_int(data: dict, name: str) -> Optional[int]:
    """An integer field that may be left out (None: the engine's default)."""
    return None if data.get(name) is None else _int(data, name)


def _bool(data: dict, name: str, default: bool) -> bool:
    v = data.get(name, default)
    if not isinstance(v, bool):
        raise _Refused(f"{name}={shown(repr(v))} is invalid: must be true or false.", name)
    return v


def _list(data: dict, name: str) -> list:
    v = data.get(name)
    if not isinstance(v, list):
        raise _Refused(f"{name} is required: a list.", name)
    return v


def _tags(v: Any) -> Optional[list[str]]:
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise _Refused(f"tags={shown(repr(v))} is invalid: a list of strings (\"weights\", \"kv_cache\").", "tags")
    return v


_GROUP = "weight_update_group"  # SGLang's default group name
# SGLang's abort_all_requests on an update (AReaL sends it with every one): every request running is aborted first
# (their finish reason "abort"), then the update runs, as SGLang does.
_ABORT_ALL = "abort_all_requests"

ROUTES: dict[str, Route] = {
    "/update_weights_from_disk": Route(
        b"POST", "update_weights_from_disk",
        ("model_path", "load_format", "weight_version", "flush_cache", "rollback_bytes", _ABORT_ALL),
        lambda d: (_str(d, "model_path", True), _str(d, "load_format"), _version(d),
                   _bool(d, "flush_cache", True), _opt_int(d, "rollback_bytes")),
        _ok("weights updated from disk")),
    "/init_weights_update_group": Route(
        b"POST", "init_weights_update_group",
        ("master_address", "master_port", "rank_offset", "world_size", "group_name", "backend", "join_timeout_s",
         "pp_rank"),
        lambda d: _group_args(d),
        _ok("joined")),
    "/update_weights_from_distributed": Route(
        b"POST", "update_weights_from_distributed",
        ("names", "dtypes", "shapes", "group_name", "flush_cache", "weight_version", "bucket_bytes", "rollback_bytes",
         "load_format", _ABORT_ALL),
        lambda d: (_load_format(d), _list(d, "names"), _list(d, "dtypes"), _list(d, "shapes"),
                   _str(d, "group_name") or _GROUP, _bool(d, "flush_cache", True), _version(d),
                   _int(d, "bucket_bytes", 512 << 20), _opt_int(d, "rollback_bytes"))[1:],
        _ok("weights updated from the group")),
    "/destroy_weights_update_group": Route(
        b"POST", "destroy_weights_update_group", ("group_name",),
        lambda d: (_str(d, "group_name") or _GROUP,), _ok("destroyed")),
    "/pause_generation": Route(
        b"POST", "pause_generation", ("mode",), lambda d: (_str(d, "mode") or "abort",), _ok("paused")),
    "/continue_generation": Route(b"POST", "continue_generation", (), lambda d: (), _ok("continued")),
    # vLLM's names (its RL dev routes, which smg's RL control plane fans out to a worker it sees as vLLM): the mode
    # (or the older wait_for_inflight_requests) and clear_cache, vLLM's defaults (abort, true), by query or body.
    "/pause": Route(b"POST", "pause_generation", ("mode", "wait_for_inflight_requests", "clear_cache"),
                    lambda d: _vllm_pause(d), _ok("paused")),
    "/resume": Route(b"POST", "continue_generation", (), lambda d: (), _ok("resumed")),
    "/is_paused": Route(b"GET", "is_paused", (), lambda d: (), lambda v: {"is_paused": v}),
    "/flush_cache": Route(b"POST", "flush_cache", (), lambda d: (),
                          lambda n: {"success": True, "message": "prefix cache flushed", "num_blocks_freed": n},
                          also=(b"GET",)),  # SGLang takes GET too (slime's and verl's flush)
    # vLLM's (SkyRL sends reset_running_requests: false; true, which would restart running requests, is refused)
    "/reset_prefix_cache": Route(b"POST", "flush_cache", ("reset_running_requests", "reset_external"),
                                 lambda d: _vllm_reset(d),
                                 lambda n: {"success": True, "message": "prefix cache reset", "num_blocks_freed": n}),
    "/release_memory_occupation": Route(b"POST", "sleep", ("tags",), lambda d: _release(d.get("tags")),
                                        _ok("memory released"), also=(b"GET",)),
    "/resume_memory_occupation": Route(b"POST", "wake_up", ("tags",), lambda d: (_tags(d.get("tags")),),
                                       _ok("memory resumed"), also=(b"GET",)),
    "/sleep": Route(b"POST", "sleep", ("level",), lambda d: (_int(d, "level", 1),), _ok("asleep")),
    "/wake_up": Route(b"POST", "wake_up", ("tags",), lambda d: (_tags(d.get("tags")),), _ok("awake")),
    "/update_weights_from_tensor": Route(
        b"POST", "update_weights_from_tensor",
        ("serialized_named_tensors", "load_format", "flush_cache", "weight_version", _ABORT_ALL),
        _tensor_args, _ok("weights updated from tensors")),
    "/weights_checker": Route(b"POST", "get_weight_version", ("action", "checksums"), _checker, _ok("")),
    "/post_process_weights": Route(b"POST", "get_weight_version",
                                   ("restore_weights_before_load", "post_process_quantization"), _post_process,
                                   lambda v: {"success": True, "message": "nothing to post-process: each rank "
                                              "quantizes a tensor as it writes it"}),
    "/pull_weights": Route(b"POST", "get_weight_version",
                           ("local_checkpoint_dir", "source_dir", "target_version"), _pull, _ok("")),
    "/get_weight_version": Route(b"GET", "get_weight_version", (), lambda d: (),
                                 lambda v: {"weight_version": v}),
    "/is_sleeping": Route(b"GET", "is_sleeping", (), lambda d: (), lambda v: {"is_sleeping": v}),
}
PATHS = tuple(ROUTES)


def _vllm_pause(data: dict) -> tuple:
    """vLLM's /pause fields as pause_generation's arguments: `mode`, or the older `wait_for_inflight_requests`
    (true: "wait", false: "abort"), not both; `clear_cache` true by default, as vLLM's."""
    mode = _str(data, "mode")
    if "wait_for_inflight_requests" in data:
        if mode is not None:
            raise _Refused("give mode or wait_for_inflight_requests (vLLM's older form), not both.",
                           "wait_for_inflight_requests")
        mode = "wait" if _bool(data, "wait_for_inflight_requests", False) else "abort"
    return (mode or "abort", _bool(data, "clear_cache", True))


# SGLang's memory tags; a release here frees the weights and the KV cache together (CUDA graphs go with them).
_RELEASE_ALL = {"weights", "kv_cache"}
_RELEASE_TAGS = _RELEASE_ALL | {"cuda_graph"}


def _vllm_reset(data: dict) -> tuple:
    """vLLM's /reset_prefix_cache fields: reset_running_requests (false only: moelink keeps running requests' KV)
    and reset_external (false only: no external KV store is reset here)."""
    for name in ("reset_running_requests", "reset_external"):
        if _bool(data, name, False):
            raise _Refused(f"{name}=true is not supported: the prefix cache is flushed, running requests keep their "
                           "KV; pass false (or pause with mode='abort' first).", name)
    return ()


def _release(tags: Any) -> tuple:
    """release_memory_occupation's tags: none (everything), or a list naming at least the weights and the KV cache
    (verl sends ["kv_cache", "weights"]); a release of one without the other is refused naming the field."""
    given = _tags(tags)
    if given is not None:
        unknown = sorted(set(given) - _RELEASE_TAGS)
        if unknown:
            raise _Refused(f"tags={shown(repr(given))} is invalid: {shown(unknown[0])!r} is not a memory tag (weights, "
                           "kv_cache, cuda_graph).", "tags")
        if not _RELEASE_ALL <= set(given):
            raise _Refused(f"tags={shown(repr(given))} is invalid: release_memory_occupation releases the weights and "
                           "the KV cache together (no tags, or both); resume them one at a time with "
                           "resume_memory_occupation.", "tags")
    return (1,)


class _Refused(ValueError):
    def __init__(self, message: str, field: Optional[str]):
        super().__init__(message)
        self.field = field


_BOOL_QUERY = ("clear_cache", "wait_for_inflight_requests", "reset_running_requests", "reset_external")


def _body(route: Route, path: str, body: bytes, query: str) -> dict:
    """The call's fields: the JSON object body, and for vLLM's routes (/sleep, /wake_up, /pause) the query
    string's."""
    data: dict = {}
    if body.strip():
        try:
            data = json.loads(body)
        except ValueError:
            raise _Refused(f"{path}: the body is not JSON (a JSON object of {', '.join(route.fields) or 'no'} "
                           "fields).", None) from None
        if not isinstance(data, dict):
            raise _Refused(f"{path}: the body must be a JSON object.", None)
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name not in route.fields:
            raise _Refused(f"{path}: query parameter {shown(name)!r} is not taken (fields: "
                           f"{', '.join(route.fields) or 'none'}).", name)
        if name in data:
            raise _Refused(f"{path}: {name} is given twice (body and query string).", name)
        if name == "level":
            try:
                data[name] = int(values[-1])
            except ValueError:
                raise _Refused(f"level={shown(values[-1])!r} is invalid: must be an integer.", "level") from None
        elif name == "tags":
            data[name] = values
        elif name in _BOOL_QUERY:  # vLLM's query booleans: true / false (any case), 1 / 0
            word = values[-1].lower()
            if word not in ("true", "false", "1", "0"):
                raise _Refused(f"{name}={shown(values[-1])!r} is invalid: must be true or false.", name)
            data[name] = word in ("true", "1")
        else:
            data[name] = values[-1]
    unknown = sorted(set(data) - set(route.fields))
    if unknown:
        raise _Refused(f"{path}: field {shown(unknown[0])!r} is not taken (fields: "
                       f"{', '.join(route.fields) or 'none'}).", unknown[0])
    return data


def _error(message: str, field: Optional[str], status: int) -> tuple[int, bytes]:
    return status, json.dumps({"success": False, "message": message,
                               **error_object(message, field, status)}).encode()


# Read-only routes: answered whatever the flag. Every other route changes weights, memory, the cache or what runs, and
# is taken only from a server started with --enable-weight-updates (flush_cache too: a client that may empty every
# user's prefix cache is a control client).
READ_ONLY = ("/get_weight_version", "/is_sleeping", "/is_paused")
DISABLED = ("{path} is refused: this server takes RL control calls only when started with --enable-weight-updates "
            "(and, where one is set, with its API key).")


class RlRoutes:
    """Answers the control routes from an AsyncEngine (`engine.control(call, *args)`) on the server's loop."""

    def __init__(self, engine, enabled: bool, max_body_bytes: Optional[int] = None,
                 abort_all: Optional[Callable[[], Any]] = None):
        """`enabled`: the server was started with --enable-weight-updates. `max_body_bytes`: the largest body the
        front reads for these routes (--max-http-body-bytes; None: the front's own cap). `abort_all`: ends every
        running request as /abort_request's abort_all does (Serving.abort_all; None: through a pause in "abort"
        mode, then continue), for an update's abort_all_requests."""
        self.engine = engine
        self.enabled = enabled
        self.max_body_bytes = max_body_bytes
        self.abort_all = abort_all
        self._bound: Optional[int] = None  # _payload_bound's, read once

    def _payload_bound(self) -> Optional[int]:
        """The most bytes one shared-memory segment of an update_weights_from_tensor payload may name: twice the
        served checkpoint's safetensors files (a float32 bucket of bf16 weights), and 1 MiB; None when the
        checkpoint's directory cannot be read (the engine's own checks still bound every tensor)."""
        if self._bound is None:
            import glob
            import os

            try:
                folder = self.engine.engine.config.model.model
                self._bound = 2 * sum(os.path.getsize(f) for f in glob.glob(os.path.join(folder, "*.safetensors"))) \
                    + (1 << 20)
            except (AttributeError, OSError, TypeError):
                return None
        return self._bound

    async def _abort_all(self) -> None:
        if self.abort_all is not None:
            await self.abort_all()
            return
        paused = await self.engine.control("is_paused")
        await self.engine.control("pause_generation", "abort")
        if not paused:
            await self.engine.control("continue_generation")

    def body_limit(self, path: str) -> Optional[int]:
        """The largest body the front reads for `path` (413 beyond it), or None for another path."""
        return self.max_body_bytes if path in ROUTES else None

    async def answer(self, method: bytes, path: str, body: bytes, query: str = "",
                     client: tuple[str, ...] = ()) -> Optional[tuple[int, bytes]]:
        """(HTTP status, JSON body) of a control route, or None for any other path. `client` is not read: who may
        call is the key's and the flag's question."""
        from ...api.async_engine import EngineDeadError
        from ...rl.errors import ControlDisabled

        route = ROUTES.get(path)
        if route is None:
            return None
        if method != route.method and method not in route.also:
            taken = " or ".join(m.decode() for m in (route.method, *route.also))
            return _error(f"{path} takes {taken}, not {method.decode('latin-1')}.", None, 405)
        if not self.enabled and path not in READ_ONLY:
            return _error(DISABLED.format(path=path), None, 403)
        try:
            # Parsed off the event loop when large (json_body.off_loop): every stream shares the loop.
            data = await off_loop(body, _body, route, path, body, query)
            abort_first = _bool(data, _ABORT_ALL, False)
            data.pop(_ABORT_ALL, None)
            args = route.args(data)
        except _Refused as e:
            return _error(str(e), e.field, 400)
        try:
            if route.call == "update_weights_from_tensor":
                from ...rl.serialized_tensors import decode_named_tensors

                entries, load_format, flush, version = args
                # Unpickled (allow-listed) and copied off the loop: a bucket may be hundreds of MiB.
                tensors = await asyncio.to_thread(decode_named_tensors, entries, load_format,
                                                  self._payload_bound())
                args = (tensors, None, version, flush)
            if abort_first:
                await self._abort_all()
            result = await self.engine.control(route.call, *args)
        except ControlDisabled as e:
            return _error(str(e), None, 403)
        except EngineDeadError as e:
            return _error(str(e), None, 503)
        except (ValueError, RuntimeError, TypeError) as e:  # the engine's refusal, naming why
            return _error(str(e), getattr(e, "field", None), 400)
        return 200, json.dumps(route.answer(result)).encode()


class ChainedRoutes:
    """Several local answerers in turn (vllm_routes.VllmRoutes, RlRoutes): the first that answers a path does. The
    first is the model's own routes: what the front asks of the served names (`route_model`, `base_name`: which
    LoRA adapter a request's `model` names, lora_routes.py) is its."""

    def __init__(self, models, *others):
        self.models = models
        self.answerers = (models, *others)

    def route_model(self, data: dict) -> Optional[str]:
        return self.models.route_model(data)

    @property
    def base_name(self) -> str:
        return self.models.base_name

    def body_limit(self, path: str) -> Optional[int]:
        """The largest body an answerer reads for `path` (the first that bounds it), or None."""
        for a in self.answerers:
            limit = getattr(a, "body_limit", None)
            most = limit(path) if limit is not None else None
            if most is not None:
                return most
        return None

    async def answer(self, method: bytes, path: str, body: bytes, query: str = "",
                     client: tuple[str, ...] = ()) -> Optional[tuple[int, bytes]]:
        """The first answer of an answerer for the request; `client` (client_identity.http_client): who sent it."""
        for a in self.answerers:
            got = await a.answer(method, path, body, query, client=client)
            if got is not None:
                return got
        return None


__all__ = ["ChainedRoutes", "PATHS", "ROUTES", "RlRoutes"]
