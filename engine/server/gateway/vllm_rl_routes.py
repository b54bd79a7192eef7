"""vLLM's weight-transfer routes and the RL frameworks' own on vLLM (SkyRL, prime-rl), answered from the engine beside
the front through the same RL control calls as the SGLang-named routes (rl_routes.py; docs/rl.md: the SkyRL and
prime-rl recipes). Nothing here updates weights itself: each route is mapped onto `engine.control(call, ...)`.

  GET  /get_world_size                 {"world_size"}: the engine's ranks (each a rank of a trainer's group).
  POST /init_weight_transfer_engine    {"init_info": {master_address, master_port, rank_offset, world_size[,
                                       backend]}}: init_weights_update_group into the group GROUP. vLLM's engine is
                                       NCCL; moelink's ranks join a torch process group, "nccl" on CUDA and "gloo"
                                       otherwise (init_info.backend; "nccl" on a CPU engine is refused naming it).
                                       A second init replaces the group, as vLLM's replaces its communicator.
  POST /update_weights                 vLLM's {"update_info": {names, dtype_names, shapes, packed,
                                       packed_buffer_size_bytes, packed_num_buffers, is_checkpoint_format}}:
                                       update_weights_from_distributed from GROUP (packed: vLLM's packed broadcast);
                                       prime-rl's {"weight_dir"}: update_weights_from_disk of that directory.
  POST /collective_rpc                 SkyRL's worker-extension calls, by `method`: skyrl_start_weight_update,
                                       update_weights_nccl (as /update_weights), skyrl_finish_weight_update, and
                                       skyrl_sleep_for_weight_sync / skyrl_wake_for_weight_sync (answered, nothing
                                       released: the update is written in place and held requests keep their KV);
                                       update_weights_ipc and any other method are refused naming `method`.
  POST /fetch_weights                  SkyRL's checkpoint-delta pull: refused naming the field (moelink applies whole
                                       checkpoints: /update_weights {"weight_dir"}).
  POST /skyrl/v1/load_lora_adapter     {lora_name, lora_path}: load, or reload in place (the name kept), an adapter.

Who may call: the API key where one is set (the front asks it: KEYED_ROUTES), and --enable-weight-updates for all
but /get_world_size (403 naming the flag), as the other RL routes. A body is a JSON object of the route's fields; a
field not taken is 400 naming it. Answers are vLLM's: `{"status": "ok", ...}` with the call's numbers beside it; a
refusal is vLLM's error object (with `success: false`), 400, 403 or 503.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

from ...config.timeouts import DEFAULT_GROUP_TIMEOUT_S, DEFAULT_JOIN_TIMEOUT_S
from ...contract.safe_text import shown
from .http_wire import error_object
from .json_body import kind_of, off_loop

GROUP = "vllm_weight_transfer"  # the group /init_weight_transfer_engine joins and /update_weights reads from
VLLM_PACKED_BUFFER_BYTES = 1 << 30  # vLLM's DEFAULT_PACKED_BUFFER_SIZE_BYTES
VLLM_PACKED_NUM_BUFFERS = 2  # vLLM's DEFAULT_PACKED_NUM_BUFFERS
WORLD_SIZE_PATH = "/get_world_size"
INIT_PATH = "/init_weight_transfer_engine"
UPDATE_PATH = "/update_weights"
RPC_PATH = "/collective_rpc"
FETCH_PATH = "/fetch_weights"
SKYRL_LORA_PATH = "/skyrl/v1/load_lora_adapter"
PATHS = (WORLD_SIZE_PATH, INIT_PATH, UPDATE_PATH, RPC_PATH, FETCH_PATH, SKYRL_LORA_PATH)
METHODS = {WORLD_SIZE_PATH: b"GET"}
INIT_FIELDS = ("master_address", "master_port", "rank_offset", "world_size", "backend")
UPDATE_FIELDS = ("names", "dtype_names", "shapes", "packed", "packed_buffer_size_bytes", "packed_num_buffers",
                 "is_checkpoint_format")
RPC_METHODS = ("skyrl_start_weight_update", "update_weights_nccl", "skyrl_finish_weight_update",
               "skyrl_sleep_for_weight_sync", "skyrl_wake_for_weight_sync")
DISABLED = ("{path} is refused: this server takes RL control calls only when started with --enable-weight-updates "
            "(and, where one is set, with its API key).")


class _Refused(ValueError):
    def __init__(self, message: str, field: Optional[str], status: int = 400):
        super().__init__(message)
        self.field, self.status = field, status


def _error(message: str, field: Optional[str], status: int) -> tuple[int, bytes]:
    return status, json.dumps({"success": False, "message": message, **error_object(message, field, status)}).encode()


def _object(body: bytes, path: str) -> dict:
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except RecursionError:
        raise _Refused("the request body is JSON nested too deeply.", "body") from None
    except ValueError:
        raise _Refused(f"{path}: the body is not JSON.", "body") from None
    if not isinstance(data, dict):
        raise _Refused(f"{path}: the body must be a JSON object, not {kind_of(data)}.", "body")
    return data


def _only(data: dict, fields: tuple, where: str) -> None:
    for key in data:
        if key not in fields:
            raise _Refused(f"{where}{shown(key)} is not taken (fields: {', '.join(fields) or 'none'}).",
                           f"{where}{key}")


def _int(data: dict, name: str, where: str, lo: int = 0) -> int:
    v = data.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _Refused(f"{where}{name}={shown(json.dumps(v))} is invalid: an integer >= {lo}.", f"{where}{name}")
    return v


def _str(data: dict, name: str, where: str) -> str:
    v = data.get(name)
    if not isinstance(v, str) or not v:
        raise _Refused(f"{where}{name} is required: a non-empty string.", f"{where}{name}")
    return v


def _bool(data: dict, name: str, where: str, default: bool) -> bool:
    v = data.get(name, default)
    if not isinstance(v, bool):
        raise _Refused(f"{where}{name}={shown(json.dumps(v))} is invalid: must be true or false.", f"{where}{name}")
    return v


def _list(data: dict, name: str, where: str) -> list:
    v = data.get(name)
    if not isinstance(v, list):
        raise _Refused(f"{where}{name} is required: a list.", f"{where}{name}")
    return v


class VllmRlRoutes:
    """Answers the routes above from a Serving's engine (`engine.control(call, *args)`) on the server's loop."""

    def __init__(self, serving, max_body_bytes: Optional[int] = None):
        self.s = serving
        self.engine = serving.engine
        self.max_body_bytes = max_body_bytes if max_body_bytes is not None else serving.limits.max_http_body_bytes
        self._joined = False  # this front joined GROUP (a later init replaces it, as vLLM's does)

    def body_limit(self, path: str) -> Optional[int]:
        return self.max_body_bytes if path in PATHS else None

    @property
    def world_size(self) -> int:
        return int(self.s.info.expert_parallel_size)

    async def answer(self, method: bytes, path: str, body: bytes, query: str = "",
                     client: tuple[str, ...] = ()) -> Optional[tuple[int, bytes]]:
        from ...api.async_engine import EngineDeadError
        from ...rl.errors import ControlDisabled

        if path not in PATHS:
            return None
        want = METHODS.get(path, b"POST")
        if method != want:
            return _error(f"{path} takes {want.decode()}, not {method.decode('latin-1')}.", None, 405)
        if query:
            return _error(f"{path} takes no query string (a JSON body).", None, 400)
        if path == WORLD_SIZE_PATH:
            return 200, json.dumps({"world_size": self.world_size}).encode()
        if not self.engine.takes_control_calls:
            return _error(DISABLED.format(path=path), None, 403)
        try:
            data = await off_loop(body, _object, body, path)
            return 200, json.dumps(await self._answer(path, data)).encode()
        except _Refused as e:
            return _error(str(e), e.field, e.status)
        except ControlDisabled as e:
            return _error(str(e), None, 403)
        except EngineDeadError as e:
            return _error(str(e), None, 503)
        except (ValueError, RuntimeError, TypeError) as e:  # the engine's refusal, naming why
            return _error(str(e), None, 400)

    async def _answer(self, path: str, data: dict) -> dict:
        if path == INIT_PATH:
            _only(data, ("init_info",), "")
            return await self._init(data.get("init_info"))
        if path == UPDATE_PATH:
            if "weight_dir" in data:  # prime-rl's: a checkpoint directory
                _only(data, ("weight_dir",), "")
                return await self._from_disk(_str(data, "weight_dir", ""), "weight_dir")
            _only(data, ("update_info",), "")
            return await self._update(data.get("update_info"), "update_info.")
        if path == RPC_PATH:
            return await self._rpc(data)
        if path == FETCH_PATH:
            _only(data, ("target_version", "sync_dir", "uri"), "")
            field = "uri" if data.get("uri") is not None else "sync_dir"
            raise _Refused(f"/fetch_weights ({field}) is not supported: moelink applies whole checkpoints, not "
                           "checkpoint deltas; publish the checkpoint and call /update_weights {\"weight_dir\"} (or "
                           "/update_weights_from_disk).", field)
        return await self._load_lora(data, path)

    async def _init(self, info: Any) -> dict:
        if not isinstance(info, dict):
            raise _Refused(f"init_info is required: an object of {', '.join(INIT_FIELDS[:4])}.", "init_info")
        where = "init_info."
        _only(info, INIT_FIELDS, where)
        device = getattr(self.s.info.device, "type", "cpu")
        backend = info.get("backend", "nccl" if device == "cuda" else "gloo")
        if backend not in ("nccl", "gloo"):
            raise _Refused(f"init_info.backend={shown(json.dumps(backend))} is invalid: \"nccl\" or \"gloo\".",
                           "init_info.backend")
        if backend == "nccl" and device != "cuda":
            raise _Refused(f"init_info.backend=\"nccl\" cannot run here: this engine runs on {device}, where NCCL "
                           "has no devices; give init_info.backend \"gloo\" (the trainer's group on gloo too).",
                           "init_info.backend")
        address = _str(info, "master_address", where)
        if self._joined:  # vLLM's init replaces the engine's communicator: the group joined before is left first
            try:
                await self.engine.control("destroy_weights_update_group", GROUP)
            except ValueError:  # destroyed meanwhile (SGLang's route), or lost with a failed update
                pass
            self._joined = False
        result = await self.engine.control(
            "init_weights_update_group", address, _int(info, "master_port", where, 1),
            _int(info, "rank_offset", where, 1), _int(info, "world_size", where, 2), GROUP, backend,
            DEFAULT_GROUP_TIMEOUT_S, DEFAULT_JOIN_TIMEOUT_S)
        self._joined = True
        return {"status": "ok", "group_name": GROUP, "backend": backend, **(result if isinstance(result, dict) else {})}

    async def _update(self, info: Any, where: str) -> dict:
        if not isinstance(info, dict):
            raise _Refused(f"{where[:-1]} is required: an object of names, dtype_names, shapes[, packed].",
                           where[:-1])
        _only(info, UPDATE_FIELDS, where)
        if not _bool(info, "is_checkpoint_format", where, True):
            raise _Refused(f"{where}is_checkpoint_format=false is not supported: moelink takes the checkpoint's "
                           "tensors (its names and shapes), not a kernel layout.", f"{where}is_checkpoint_format")
        packed = _bool(info, "packed", where, False)
        size = info.get("packed_buffer_size_bytes", VLLM_PACKED_BUFFER_BYTES)
        if packed:
            size = _int(info, "packed_buffer_size_bytes", where, 1) if "packed_buffer_size_bytes" in info else size
            if "packed_num_buffers" in info:
                _int(info, "packed_num_buffers", where, 1)  # the sender's pipelining: the wire is the same
        result = await self.engine.control(
            "update_weights_from_distributed", _list(info, "names", where), _list(info, "dtype_names", where),
            _list(info, "shapes", where), GROUP, True, None, size if packed else 512 << 20, None, packed)
        return {"status": "ok", **(result if isinstance(result, dict) else {})}

    async def _from_disk(self, path: str, field: str) -> dict:
        try:
            result = await self.engine.control("update_weights_from_disk", path, None, None, True, None)
        except ValueError as e:
            raise _Refused(str(e), field) from None
        return {"status": "ok", **(result if isinstance(result, dict) else {})}

    async def _rpc(self, data: dict) -> dict:
        _only(data, ("method", "args", "kwargs", "timeout"), "")
        method = data.get("method")
        if method not in RPC_METHODS:
            why = {"update_weights_ipc": "CUDA IPC handles reach only a process on the trainer's devices; use the "
                                         "broadcast (update_weights_nccl) or a checkpoint",
                   }.get(method if isinstance(method, str) else "", "it is not one of moelink's")
            raise _Refused(f"method={shown(json.dumps(method))} is not supported: {why} (taken: "
                           f"{', '.join(RPC_METHODS)}).", "method")
        if data.get("args") not in (None, []):
            raise _Refused("args is not taken: give the method's arguments in kwargs.", "args")
        kwargs = data.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise _Refused("kwargs must be an object.", "kwargs")
        if method == "update_weights_nccl":
            _only(kwargs, ("update_info",), "kwargs.")
            return {"status": "ok", "result": [await self._update(kwargs.get("update_info"), "kwargs.update_info.")]}
        if method == "skyrl_start_weight_update":
            _only(kwargs, ("is_checkpoint_format",), "kwargs.")
            if not _bool(kwargs, "is_checkpoint_format", "kwargs.", True):
                raise _Refused("kwargs.is_checkpoint_format=false is not supported: moelink takes the checkpoint's "
                               "tensors, not a kernel layout.", "kwargs.is_checkpoint_format")
        elif method == "skyrl_sleep_for_weight_sync":
            _only(kwargs, ("offload_kv",), "kwargs.")
            _bool(kwargs, "offload_kv", "kwargs.", True)
            return {"status": "ok", "result": [None] * self.world_size, "released": [],
                    "message": "nothing released: the update is written in place (it needs no freed device memory "
                               "but its bucket) and the held requests keep their KV, as offload_kv asks; /sleep "
                               "releases memory when no request is held"}
        elif method == "skyrl_wake_for_weight_sync":
            _only(kwargs, ("tags",), "kwargs.")
            tags = kwargs.get("tags")
            if not isinstance(tags, list) or not tags or any(t not in ("weights", "kv_cache") for t in tags):
                raise _Refused(f"kwargs.tags={shown(json.dumps(tags))} is invalid: a list of \"weights\", "
                               "\"kv_cache\".", "kwargs.tags")
            return {"status": "ok", "result": [None] * self.world_size, "woken": []}
        else:
            _only(kwargs, (), "kwargs.")
        # Start and finish: each update is whole in itself here (written in place, rolled back on failure), so there
        # is nothing to open or close around it; answered as the worker extension answers.
        return {"status": "ok", "result": [None] * self.world_size}

    async def _load_lora(self, data: dict, path: str) -> dict:
        _only(data, ("lora_name", "lora_path", "load_inplace"), "")
        adapters = self.s.adapters
        if not adapters.enabled:
            raise _Refused(f"{path} is not served: this server serves no LoRA adapters (start it with --enable-lora).",
                           None, 404)
        name, lora_path = _str(data, "lora_name", ""), _str(data, "lora_path", "")
        old = adapters.get(name)
        try:  # reloaded in place: the name serves the new files once they pass the check, else keeps the old ones
            request = await asyncio.to_thread(adapters.add, name, lora_path, "lora_name", True)
        except ValueError as e:
            raise _Refused(str(e), "lora_path" if "lora_path" in str(e) else "lora_name") from None
        return {"status": "ok", "lora_name": name, "lora_int_id": request.lora_int_id, "reloaded": old is not None}


__all__ = ["GROUP", "PATHS", "VllmRlRoutes"]
