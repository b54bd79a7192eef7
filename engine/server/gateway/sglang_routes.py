"""SGLang's informational and LoRA routes on the HTTP port, for the SGLang-shaped RL frameworks (slime, verl, AReaL:
docs/rl.md#over-http), answered from the engine beside the front:

- `GET /get_server_info` (and `/server_info`, its newer name): the server's settings as SGLang names the ones these
  clients read (model_path, tp_size, dp_size, ep_size, the flags), with `version` and `internal_states`.
- `GET /v1/loads` and `/get_load`: what runs and waits, SGLang's per-rank load entries.
- `GET /health_generate`: one greedy token generated (SGLang's probe): 200 once it came back, 503 when it did not
  within HEALTH_TIMEOUT_S (the front answers 503 first when the engine died).
- `POST /load_lora_adapter`, `/unload_lora_adapter`: SGLang's names for vLLM's /v1/load_lora_adapter and
  /v1/unload_lora_adapter (lora_routes.py: the same switches, --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=1).

Every route but /health_generate (a probe, like /health) takes the API key where one is set (http_routes.KEYED_ROUTES);
each takes no body beyond the front's small-body bound but the LoRA ones (a JSON object of their fields).
"""
from __future__ import annotations

import asyncio
import json
import uuid
from typing import Optional

from ...contract.sampling_params import SamplingParams
from . import lora_routes
from .http_wire import error_object, moelink_version

INFO_PATHS = ("/get_server_info", "/server_info")
LOAD_PATHS = ("/v1/loads", "/get_load")
HEALTH_GENERATE_PATH = "/health_generate"
LORA_ALIASES = {"/load_lora_adapter": lora_routes.LOAD_PATH, "/unload_lora_adapter": lora_routes.UNLOAD_PATH}
PATHS = INFO_PATHS + LOAD_PATHS + tuple(LORA_ALIASES)
HEALTH_TIMEOUT_S = 20.0  # SGLang's SGLANG_HEALTH_CHECK_TIMEOUT default


def _error(message: str, status: int, field: Optional[str] = None) -> bytes:
    return json.dumps({"success": False, "message": message, **error_object(message, field, status)}).encode()


class SglangRoutes:
    """Answers SGLang's info, load, health_generate and LoRA routes from a Serving (serving.py)."""

    def __init__(self, serving):
        self.s = serving
        # /load_lora_adapter is SGLang's name and prime-rl's (its vLLM server's wrapper, which loads in place): a
        # served name is reloaded with the new files rather than refused, which both kinds of client can use.
        self.lora = lora_routes.LoraRoutes(serving, reload=True)
        self._probe: Optional[asyncio.Future] = None  # the /health_generate generation in flight (health_generate)

    async def answer(self, method: bytes, path: str, body: bytes, query: str = "",
                     client: tuple[str, ...] = ()) -> Optional[tuple[int, bytes]]:
        if path in LORA_ALIASES:
            status, out = await self.lora.answer(method, LORA_ALIASES[path], body)
            if status == 200:  # SGLang's LoadLoRAAdapterReqOutput: success and the adapters loaded
                out = {"success": True, "error_message": "", **out,
                       "loaded_adapters": {a.lora_name: a.lora_path for a in self.s.adapters.served()}}
            return status, json.dumps(out).encode()
        if path not in INFO_PATHS + LOAD_PATHS + (HEALTH_GENERATE_PATH,):
            return None
        if method != b"GET":
            return 405, _error(f"{path} takes GET, not {method.decode('latin-1')}.", 405)
        if path == HEALTH_GENERATE_PATH:
            return await self.health_generate()
        if path in LOAD_PATHS:
            return 200, json.dumps(self.loads()).encode()
        return 200, json.dumps(self.server_info()).encode()

    def server_info(self) -> dict:
        engine = self.s.engine
        info = self.s.info
        config = engine.engine.config
        return {
            "model_path": self.s.model_arg, "tokenizer_path": self.s.model_arg,
            "served_model_name": self.s.served_model_name, "tp_size": config.parallel.tensor_parallel_size,
            "dp_size": 1, "ep_size": info.expert_parallel_size, "pp_size": 1,
            "context_length": info.max_model_len, "max_running_requests": info.max_num_seqs,
            "page_size": info.block_size, "max_total_num_tokens": info.num_kv_blocks * info.block_size,
            "enable_return_routed_experts": bool(getattr(config, "return_routed_experts", False)),
            "enable_weight_updates": engine.takes_control_calls, "enable_lora": bool(self.s.adapters.enabled),
            "device": info.device.type, "load_format": info.load_format, "kv_cache_dtype": info.kv_cache_dtype,
            "weight_version": engine.engine.rl.weight_version,
            "internal_states": [{"weight_version": engine.engine.rl.weight_version,
                                 "is_paused": engine.engine.rl.is_paused(),
                                 "is_sleeping": engine.engine.rl.memory.is_sleeping()}],
            "version": moelink_version(), "engine": "moelink"}

    def loads(self) -> dict:
        running = len(self.s.registry.active)
        return {"loads": [{"dp_rank": 0, "num_reqs": running, "num_running_reqs": running, "num_waiting_reqs": 0}],
                "num_reqs": running}

    async def health_generate(self) -> tuple[int, bytes]:
        """One greedy token from token id 0, as SGLang's probe, shared by every probe that comes while it runs: the
        route takes no key, and each probe generating its own let 16 keyless connections in a loop keep 16 sequences
        in the engine (a stream's token gap p50 0.021 s, against 0.013 s under the same flood of /health and 0.002 s
        alone; 0.004 s shared): now at most one probe's sequence runs at a time, whatever the callers. A caller that
        hangs up does not end the probe the others wait on (shielded)."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._generate_one())
        return await asyncio.shield(self._probe)

    async def _generate_one(self) -> tuple[int, bytes]:
        """One probe's generation; its id is the server's own (no client's)."""
        engine = self.s.engine

        async def one() -> None:
            async for _ in engine.generate(f"HEALTH_CHECK_{uuid.uuid4().hex}", [0],
                                           SamplingParams(max_tokens=1, temperature=0.0)):
                break
        try:
            await asyncio.wait_for(one(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return 503, _error(f"no token within {HEALTH_TIMEOUT_S:g} s.", 503)
        except ValueError as e:  # asleep, paused weights half-written: not serving generation now
            return 503, _error(f"the engine does not generate now: {str(e)[:300]}", 503)
        except Exception as e:  # noqa: BLE001  (the engine died: the front's own 503 names it next time)
            return 503, _error(f"the engine does not generate: {type(e).__name__}.", 503)
        return 200, b""


__all__ = ["HEALTH_GENERATE_PATH", "PATHS", "SglangRoutes"]
