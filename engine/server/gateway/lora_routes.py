"""LoRA adapters through the OpenAI API (docs/lora.md#serving-adapters): the request's `model` names the adapter,
`/v1/models` lists the adapters with their base as `parent`, `POST /v1/load_lora_adapter` and
`POST /v1/unload_lora_adapter` add and remove one while the server runs, as vLLM serves them.

How an adapter reaches the engine: smg's VllmEngine GenerateRequest (smg_grpc_proto 0.4, smg 1.13) has no LoRA field,
and smg routes a request by its `model` to the workers serving that name. So the front (http_front.py) reads a
generation request's `model` (chat, completions, responses, messages: openai_fields.ADAPTER_PATHS); when it is an adapter, the request goes to smg under the base model's name, and
the adapter's name is noted under the request's relay id (hangups.py: smg makes it the gRPC request id's prefix),
where the VllmEngine service reads it (`adapter_of`): the same in-process seam as tool_calls.py. A front started by
hand (`moelink http-front`) runs in another process and knows no adapters: there a request naming one gets smg's
404. A `model` that is neither a served name nor an adapter is 404 naming it, as vLLM answers.

Runtime updates, as vLLM: the load and unload routes are served only with --enable-lora and the environment's
VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 (or true) when the server starts: a load makes the server read a directory a
client names, which an operator allows on purpose. Otherwise they answer 404 naming what to set. With --api-key they
need the key, as every path under /v1 does (http_front.py asks it before any route is answered). A load reads the adapter's headers on a
worker thread, never on the engine's step loop; an unload lets the requests already running under the adapter end
under it.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Optional

from ...contract.safe_text import shown
from .http_wire import error_object

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"
ROUTES = (LOAD_PATH, UNLOAD_PATH)
RUNTIME_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # vLLM's switch for the two routes, read the same way

# Relay ids (hangups.py) of the requests being relayed under an adapter -> the adapter's name: the front adds one
# before it relays the request and removes it when the relay ends; the VllmEngine service reads it. One process.
_ADAPTER: dict[str, str] = {}


def note_adapter(relay_id: str, name: str) -> None:
    _ADAPTER[relay_id] = name


def forget_adapter(relay_id: str) -> None:
    _ADAPTER.pop(relay_id, None)


def adapter_of(request_id: str) -> Optional[str]:
    """The adapter name the front noted for the request behind gRPC request id `request_id`, or None."""
    if not _ADAPTER:
        return None
    from .hangups import relay_of

    relay = relay_of(request_id)
    return None if relay is None else _ADAPTER.get(relay)


class LoraRoutes:
    """The adapters' side of the front, on a Serving (serving.py) beside it."""

    def __init__(self, serving, environ=os.environ, reload: bool = False):
        """`reload`: every load of a served name replaces its files (prime-rl's /load_lora_adapter, which loads
        the trainer's adapter under one name each step, as vLLM's load_inplace)."""
        self.s = serving
        self.reload = reload
        self.runtime_updates = environ.get(RUNTIME_ENV, "0").strip().lower() in ("1", "true")

    def route(self, model) -> Optional[str]:
        """The adapter a chat or completions request's `model` names, or None for the base model (a served name,
        or no `model`: smg answers that). Raises LookupError for a name neither served nor an adapter."""
        if model is None or not isinstance(model, str):
            return None  # smg's to refuse, as before
        names = self.s.served_model_names + self.s.model_aliases
        if model in names:
            return None
        if self.s.adapters.get(model) is not None:
            return model
        raise LookupError(f"The model `{shown(model, quote=False)}` does not exist: this server serves "
                          f"{', '.join(map(repr, self.s.served_model_names))}"
                          + "".join(f", {a.lora_name!r}" for a in self.s.adapters.served()) + ".")

    def cards(self, now: int, card) -> list[dict]:
        """vLLM's model card of each adapter: `root` its directory, `parent` the base model's first name."""
        return [dict(card(a.lora_name, now), root=a.lora_path, parent=self.s.served_model_name)
                for a in self.s.adapters.served()]

    async def answer(self, method: bytes, path: str, body: bytes) -> tuple[int, dict]:
        """(HTTP status, JSON body) of a load or an unload."""
        if method != b"POST":
            return 405, _err(f"{path} takes POST (a JSON body).", None, 405)
        if not self.s.adapters.enabled:
            return 404, _err(f"{path} is not served: this server serves no LoRA adapters (start it with "
                             f"--enable-lora and {RUNTIME_ENV}=1).", None, 404)
        if not self.runtime_updates:
            return 404, _err(f"{path} is not served: runtime adapter updates are off (start the server with "
                             f"{RUNTIME_ENV}=1 in its environment, as vLLM).", None, 404)
        try:
            data = json.loads(body)
        except RecursionError:  # nested past the parser's depth: one 400, not a dropped connection
            return 400, _err("the request body is JSON nested too deeply.", "body")
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return 400, _err("the request body must be a JSON object.", "body")
        name = data.get("lora_name")
        if not isinstance(name, str) or not name:
            return 400, _err(f"lora_name={shown(json.dumps(name))} is invalid: give the adapter's name (a "
                             "non-empty string).", "lora_name")
        if path == UNLOAD_PATH:
            extra = sorted(set(data) - {"lora_name", "lora_int_id"})
            if extra:
                return 400, _err(f"{shown(extra[0])} is not a field of {path} (it takes lora_name).", extra[0])
            try:
                self.s.adapters.remove(name)
            except KeyError:
                return 404, _err(f"The lora adapter {shown(name)} cannot be found.", "lora_name", 404)
            return 200, {"message": f"Success: LoRA adapter '{name}' removed successfully."}
        extra = sorted(set(data) - {"lora_name", "lora_path", "load_inplace"})
        if extra:
            return 400, _err(f"{shown(extra[0])} is not a field of {path} (it takes lora_name, lora_path).",
                             extra[0])
        inplace = data.get("load_inplace", False)
        if not isinstance(inplace, bool):
            return 400, _err("load_inplace must be true or false.", "load_inplace")
        lora_path = data.get("lora_path")
        if not isinstance(lora_path, str) or not lora_path:
            return 400, _err(f"lora_path={shown(json.dumps(lora_path))} is invalid: give the adapter's directory.",
                             "lora_path")
        t0 = time.monotonic()
        try:
            # Its headers are read and checked on a worker thread: the event loop and the step loop go on.
            # load_inplace (vLLM's): a served name takes the new files, checked before the old ones are let go.
            await asyncio.to_thread(self.s.adapters.add, name, lora_path, "lora_name", inplace or self.reload)
        except ValueError as e:  # the name, the path or the adapter's files: one error naming the field
            return 400, _err(str(e), "lora_path" if "lora_path" in str(e) else "lora_name")
        except Exception as e:  # noqa: BLE001  (ServedAdapters.add turns the files' errors into ValueError)
            return 400, _err(f"adapter {shown(name)} is refused: {type(e).__name__}.", "lora_path")
        return 200, {"message": f"Success: LoRA adapter '{name}' added successfully.",
                     "seconds": round(time.monotonic() - t0, 3)}


def _err(message: str, param: Optional[str], code: int = 400) -> dict:
    return error_object(message, param, code)
