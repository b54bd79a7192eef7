"""vLLM AsyncLLM's RL surface on moelink's engines, as OpenRLHF drives it in process (docs/rl.md, "OpenRLHF"):
its rollout actor (openrlhf/trainer/ray/vllm_engine.py, RolloutRayActor) holds a `vllm.AsyncLLMEngine` and calls
`generate(prompt, sampling_params, request_id=...)`, `is_sleeping()`, `sleep(level)`, `wake_up(tags)`,
`reset_prefix_cache()`, `pause_generation(mode="keep")`, `resume_generation()` and
`collective_rpc(name, args=...)` of its worker extension (vllm_worker_wrap.WorkerWrap: `init_process_group`,
`update_weight`, `update_weight_cuda_ipc`).

`AsyncEngine` keeps a `VllmAsyncCompat` and delegates those methods to it (engine/api/async_engine.py); `LLM` takes
`collective_rpc` through `WorkerRpc` (its other names it has already). Each maps onto moelink's RL control
(engine/rl/control.py, memory.py; the served engine's `control` calls, engine/api/rl_calls.py):

| vLLM / OpenRLHF | moelink |
| --- | --- |
| `pause_generation(mode, clear_cache)` | `pause_generation(mode)`; `clear_cache` flushes the prefix cache (after the drain with "wait") |
| `resume_generation()`, `is_paused()` | `continue_generation`, `is_paused` |
| `sleep(level, mode)` | pause (`mode`), then memory `sleep(level)` (level 0: the pause alone) |
| `wake_up(tags)` | memory `wake_up(tags)`; once nothing is released, generation resumes (vLLM's) |
| `is_sleeping()` | paused or any memory released (vLLM's: its scheduler paused or its executor asleep) |
| `reset_prefix_cache()` | `flush_cache` |
| `collective_rpc("init_process_group", ...)` | `init_weights_update_group` (the trainer's side: engine/rl/trainer.OpenRLHFGroup) |
| `collective_rpc("update_weight", name, dtype, shape)` | `update_weights_from_distributed([name], [dtype], [shape])` |
| `collective_rpc("update_weight_cuda_ipc", ...)` | the tensor rebuilt from its CUDA IPC handle, `update_weights_from_tensor` |
| `output_processor.get_num_unfinished_requests()` | the requests whose streams are still read |

Where moelink differs it says so in the call's docstring; any other rpc name is refused naming it.
"""
from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from ..contract.lora import LoRARequest
from ..contract.safe_text import shown
from ..contract.sampling_params import SamplingParams
from ..core.outputs import OutputKind

# OpenRLHF's worker extension's methods (openrlhf/trainer/ray/vllm_worker_wrap.py, WorkerWrap), with their
# parameters in order and their defaults: what collective_rpc takes.
RPC_METHODS: dict[str, tuple[tuple[str, Any], ...]] = {
    "init_process_group": (("master_address", None), ("master_port", None), ("rank_offset", None),
                           ("world_size", None), ("group_name", None), ("backend", "nccl"), ("use_ray", False)),
    "update_weight": (("name", None), ("dtype", None), ("shape", None), ("empty_cache", False)),
    "update_weight_cuda_ipc": (("name", None), ("dtype", None), ("shape", None), ("ipc_handles", None),
                               ("empty_cache", False)),
}
_REQUIRED = object()
PAUSE_MODES = ("abort", "wait", "keep")
# vLLM's generate keywords moelink has no use for: taken at their defaults only, refused by name otherwise.
_GENERATE_DEFAULTS = {"priority": 0, "data_parallel_rank": None, "session_id": None, "reasoning_ended": None,
                      "reasoning_parser_kwargs": None}
# Taken and ignored: they change nothing moelink returns (vLLM's tracing headers, the prompt's text it reports).
_GENERATE_IGNORED = ("trace_headers", "prompt_text")


@dataclass(frozen=True)
class GenerateCall:
    """One AsyncEngine.generate call, whichever form it came in."""

    request_id: str
    prompt: Any
    params: SamplingParams | None
    output_kind: OutputKind
    lora_request: LoRARequest | None
    tokenization_kwargs: dict | None = None


def generate_call(args: tuple, kwargs: dict) -> GenerateCall:
    """Read AsyncEngine.generate's arguments in either form: moelink's `generate(request_id, prompt, params=None,
    output_kind=CUMULATIVE, lora_request=None)`, or vLLM AsyncLLM's `generate(prompt, sampling_params, request_id, *,
    lora_request=None, tokenization_kwargs=None, ...)` (its second argument a SamplingParams, or `sampling_params`
    named). In vLLM's form the output kind is the params' `output_kind` when they have one (vLLM's RequestOutputKind:
    CUMULATIVE, DELTA, FINAL_ONLY), else cumulative, as vLLM's default."""
    kwargs = dict(kwargs)
    vllm_form = "sampling_params" in kwargs or (len(args) >= 2 and isinstance(args[1], SamplingParams))
    if not vllm_form:
        names = ("request_id", "prompt", "params", "output_kind", "lora_request")
        bound = _bind("generate", names, args, kwargs, {"params": None, "output_kind": OutputKind.CUMULATIVE,
                                                        "lora_request": None})
        return GenerateCall(bound["request_id"], bound["prompt"], bound["params"], bound["output_kind"],
                            bound["lora_request"])
    if len(args) > 3:
        raise TypeError(f"generate takes prompt, sampling_params and request_id positionally (vLLM's), not "
                        f"{len(args)} arguments: name the others (lora_request=...).")
    for key, default in _GENERATE_DEFAULTS.items():
        value = kwargs.pop(key, default)
        if value != default:
            raise ValueError(f"generate's {key}={shown(value)} is not supported by moelink (vLLM's keyword): leave it "
                             f"at {default!r}.")
    for key in _GENERATE_IGNORED:
        kwargs.pop(key, None)
    names = ("prompt", "sampling_params", "request_id", "lora_request", "tokenization_kwargs")
    bound = _bind("generate", names, args, kwargs, {"lora_request": None, "tokenization_kwargs": None})
    params = bound["sampling_params"]
    kind = getattr(params, "output_kind", None)
    kind = OutputKind.CUMULATIVE if kind is None else OutputKind[getattr(kind, "name", str(kind)).upper()]
    return GenerateCall(bound["request_id"], bound["prompt"], params, kind, bound["lora_request"],
                        bound["tokenization_kwargs"])


def _bind(call: str, names: tuple[str, ...], args: tuple, kwargs: dict, defaults: dict) -> dict:
    """`args` and `kwargs` bound to `names` in order (a Python signature's binding, TypeError as Python words it)."""
    if len(args) > len(names):
        raise TypeError(f"{call}() takes at most {len(names)} positional arguments ({len(args)} given)")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"{call}() got an unexpected keyword argument {key!r}")
        if key in bound:
            raise TypeError(f"{call}() got multiple values for argument {key!r}")
        bound[key] = value
    for key in names:
        if key not in bound:
            if key not in defaults:
                raise TypeError(f"{call}() missing required argument: {key!r}")
            bound[key] = defaults[key]
    return bound


def physical_gpu_id(device) -> str:
    """The key OpenRLHF's trainer files a CUDA IPC handle under (openrlhf/trainer/ray/utils.get_physical_gpu_id):
    the device's UUID."""
    import torch

    if getattr(device, "type", None) != "cuda":
        raise ValueError(f"update_weight_cuda_ipc needs an engine on a CUDA device (this one runs on {device}): "
                         "use update_weight over a process group.")
    return str(torch.cuda.get_device_properties(device).uuid)


class WorkerRpc:
    """OpenRLHF's worker extension calls (RPC_METHODS) as moelink RL control calls. Remembers the group
    `init_process_group` joined: `update_weight` names none (OpenRLHF's worker keeps it as moelink does here)."""

    def __init__(self, device_of: Callable[[], Any] | None = None):
        self.group: str | None = None
        # The engine's device (a CUDA IPC handle is opened on it; OpenRLHF's worker swaps in its own index).
        self._device_of = device_of

    def plan(self, method, args: tuple = (), kwargs: dict | None = None) -> tuple[str, tuple]:
        """The RL control call (its name, its arguments) that `collective_rpc(method, args=args, kwargs=kwargs)` runs;
        ValueError naming a method moelink does not map."""
        if not isinstance(method, str):
            raise ValueError(f"collective_rpc method={shown(method)} is not supported: moelink's ranks take named calls "
                             "only (a callable would run inside vLLM's workers); choose from "
                             f"{', '.join(RPC_METHODS)}.")
        if method not in RPC_METHODS:
            raise ValueError(f"collective_rpc method={method!r} is not supported by moelink: it maps OpenRLHF's "
                             f"worker extension calls {', '.join(RPC_METHODS)} (docs/rl.md, OpenRLHF); for other "
                             "weight updates use update_weights_from_disk / update_weights_from_distributed.")
        spec = RPC_METHODS[method]
        a = _bind(f"collective_rpc({method!r})", tuple(n for n, _ in spec), tuple(args), dict(kwargs or {}),
                  {n: d for n, d in spec if d is not None or n in ("ipc_handles",)})
        if method == "init_process_group":
            if a["use_ray"]:
                raise ValueError("collective_rpc('init_process_group') with use_ray=True is not supported: moelink's "
                                 "ranks join a torch process group (the trainer's end: engine/rl/trainer.OpenRLHFGroup); "
                                 "set OpenRLHF's vllm.sync_with_ray off.")
            return "init_weights_update_group", (a["master_address"], a["master_port"], a["rank_offset"],
                                                 a["world_size"], a["group_name"], a["backend"])
        name, dtype, shape = a["name"], a["dtype"], a["shape"]
        shape = list(shape) if isinstance(shape, (list, tuple)) or type(shape).__name__ == "Size" else shape
        if method == "update_weight":
            if self.group is None:
                raise ValueError("collective_rpc('update_weight') is refused: no weight update group is joined "
                                 "(collective_rpc('init_process_group', ...) first).")
            return "update_weights_from_distributed", ([name], [dtype], [shape], self.group)
        return "update_weights_from_tensor", ([(name, self._from_ipc(name, dtype, shape, a["ipc_handles"]))],)

    def joined(self, call: str, call_args: tuple) -> None:
        """A planned call succeeded: a join remembers its group."""
        if call == "init_weights_update_group":
            self.group = call_args[4]

    def _from_ipc(self, name: str, dtype, shape, ipc_handles):
        """The tensor OpenRLHF's trainer shared for this engine's device: its handle (func, args) rebuilt on the
        engine's device (args[6], the device index, swapped as OpenRLHF's worker does)."""
        import torch

        device = torch.device("cpu") if self._device_of is None else self._device_of()
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if not isinstance(ipc_handles, dict):
            raise ValueError(f"update_weight_cuda_ipc's ipc_handles={shown(ipc_handles)} is invalid: a dict of "
                             "{physical GPU id: CUDA IPC handle}.")
        key = physical_gpu_id(device)
        if key not in ipc_handles:
            raise ValueError(f"update_weight_cuda_ipc: no CUDA IPC handle for this engine's GPU {key!r} (the handles "
                             f"name {len(ipc_handles)} GPUs): colocate the engine with a trainer rank.")
        func, handle_args = ipc_handles[key]
        handle_args = list(handle_args)
        handle_args[6] = device.index or 0
        tensor = func(*handle_args)
        if tuple(tensor.shape) != tuple(shape) or (dtype is not None and tensor.dtype != dtype):
            raise ValueError(f"update_weight_cuda_ipc: tensor {name!r} opened as {tensor.dtype} "
                             f"{list(tensor.shape)}, announced {dtype} {list(shape)}.")
        return tensor


class VllmAsyncCompat:
    """vLLM AsyncLLM's RL calls on an AsyncEngine (`engine`: its `control`, `paused`, `engine.config`), with vLLM's
    names, keywords and results (None where vLLM's return None)."""

    # Between two looks at a draining pause("wait") (vLLM's pause returns once in-flight requests ended).
    DRAIN_POLL_S = 0.01

    def __init__(self, engine):
        self._engine = engine
        self._rpc = WorkerRpc(lambda: engine.info.device)

    def get_num_unfinished_requests(self) -> int:
        """vLLM's OutputProcessor.get_num_unfinished_requests (OpenRLHF's rollout actor reads it through
        `llm.output_processor`, AsyncEngine's property that returns this object)."""
        return self._engine.num_unfinished_requests()

    def _ranks(self) -> int:
        return int(self._engine.engine.config.parallel.world_size)

    async def is_sleeping(self) -> bool:
        """vLLM's: True while generation is paused or any memory is released (its scheduler paused or its executor
        asleep)."""
        return bool(await self._engine.control("is_paused") or await self._engine.control("is_sleeping"))

    async def is_paused(self) -> bool:
        return bool(await self._engine.control("is_paused"))

    async def pause_generation(self, *, mode: str = "abort", wait_for_inflight_requests: bool | None = None,
                               clear_cache: bool = True) -> None:
        """vLLM's pause: "abort" ends every request, "wait" returns once the started requests ended (nothing new
        starts), "keep" holds them in place until resume_generation. `clear_cache` forgets every cached prefix (after
        the drain with "wait"). Where moelink differs: with "keep" the held requests keep their KV (vLLM resets it and
        recomputes their prefixes under the new weights); their tokens after an update name both weight versions
        (RequestOutput.weight_versions)."""
        if wait_for_inflight_requests:
            warnings.warn("pause_generation's wait_for_inflight_requests is deprecated (vLLM's): use mode='wait'.",
                          DeprecationWarning, stacklevel=2)
            mode = "wait"
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode={mode!r} is invalid: choose from {', '.join(PAUSE_MODES)}.")
        if not isinstance(clear_cache, bool):
            raise ValueError(f"clear_cache={clear_cache!r} is invalid: must be True or False.")
        await self._engine.control("pause_generation", mode, False)
        if mode == "wait":
            while self._engine.stats().num_running:  # a plain counter the engine thread writes
                await asyncio.sleep(self.DRAIN_POLL_S)
        if clear_cache:
            await self._engine.control("flush_cache")

    async def resume_generation(self) -> None:
        await self._engine.control("continue_generation")

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """vLLM's sleep: generation paused (`mode` as pause_generation's), then at level 1 the weights go to host
        memory and the KV cache is freed, at level 2 the weights are dropped (an update fills them); level 0 is the
        pause alone. wake_up resumes generation once nothing is released. Needs enable_weight_updates."""
        if isinstance(level, bool) or level not in (0, 1, 2):
            raise ValueError(f"level={level!r} is invalid: choose from 0, 1, 2.")
        await self.pause_generation(mode=mode, clear_cache=level >= 1)
        if level >= 1:
            await self._engine.control("sleep", level)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """vLLM's wake_up: the released parts named by `tags` ("weights", "kv_cache"; None: all) back; once nothing is
        released, generation resumes (also after a pause_generation, as vLLM's). vLLM's "scheduling" tag is the
        resume alone."""
        rest = None if tags is None else [t for t in tags if t != "scheduling"]
        if rest is None or rest:
            if await self._engine.control("is_sleeping"):
                await self._engine.control("wake_up", rest)
        if not await self._engine.control("is_sleeping") and await self._engine.control("is_paused"):
            await self._engine.control("continue_generation")

    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """vLLM's: forget every cached prefix (blocks of running requests stay theirs); True. moelink's flush also
        resets the KV offload tiers' view (reset_connector); reset_running_requests=True (recompute running requests'
        KV) is refused."""
        if reset_running_requests:
            raise ValueError("reset_prefix_cache(reset_running_requests=True) is not supported: moelink keeps running "
                             "requests' KV; pause_generation(mode='abort') ends them first.")
        await self._engine.control("flush_cache")
        return True

    async def collective_rpc(self, method, timeout: float | None = None, args: tuple = (),
                             kwargs: dict | None = None) -> list:
        """OpenRLHF's worker extension calls (RPC_METHODS) run as moelink's RL control calls; a list with one entry per
        rank (None each: what OpenRLHF's WorkerWrap methods return). `timeout` bounds the wait (TimeoutError); the
        call runs on. Any other method is refused naming it."""
        call, call_args = self._rpc.plan(method, args, kwargs)
        if call == "update_weights_from_tensor":  # tensors in process: not a call a front end makes (rl_calls)
            run = self._engine.tensor_update(*call_args)
        else:
            run = self._engine.control(call, *call_args)
        await asyncio.wait_for(run, timeout)
        self._rpc.joined(call, call_args)
        return [None] * self._ranks()
