"""The driver's check of a request's adapter, before any rank reads it: read once per adapter id (its config, its
tensors' headers against the served checkpoint's, and every tensor's values: finite and bounded;
engine/lora/adapter.py), then remembered. An adapter is admitted whole or refused with one ValueError naming what is
wrong: a file that is not what it claims (cut short, 1M keys, JSON nested past the parser) is such an error too, never
another exception."""
from __future__ import annotations

import threading

from ..config.lora import LoRAConfig
from ..contract.lora import LoRARequest
from ..contract.safe_text import shown
from .adapter import check_target_modules, model_targets, read_adapter


class AdapterChecker:
    """Checks LoRARequests against `model_dir`'s checkpoint under `limits`; thread-safe (requests are processed on
    many threads)."""

    def __init__(self, limits: LoRAConfig, model_dir: str, routed_refused: str | None = None):
        """routed_refused: the flag under which routed-expert adapters are refused ("eplb_interval=8": experts move
        between ranks, their A / B would have to follow; engine/config/lora.py routed_lora_refusal); None: served."""
        self.limits = limits
        self.targets = model_targets(model_dir)
        check_target_modules(limits.target_modules, self.targets)  # at the engine's start: a typo stops it
        self.routed_refused = routed_refused
        self._known: dict[int, LoRARequest] = {}
        self._lock = threading.Lock()

    def check(self, req: object) -> LoRARequest:
        """`req` as a checked LoRARequest; ValueError naming the field otherwise."""
        if not isinstance(req, LoRARequest):
            raise ValueError(f"lora_request={shown(req)} is invalid: must be a LoRARequest(lora_name, lora_int_id, "
                             "lora_path) or None.")
        with self._lock:
            known = self._known.get(req.lora_int_id)
        if known is not None:
            if known != req:
                raise ValueError(f"LoRARequest.lora_int_id={req.lora_int_id} is invalid: it already names adapter "
                                 f"{shown(known.lora_name)} at {shown(known.lora_path)}; give each adapter its own "
                                 "id.")
            return req
        try:
            # Values scanned and dropped (meta tensors kept): the ranks read the weights themselves.
            adapter = read_adapter(req, self.limits, self.targets, load=False)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001  (anything else the files make the reader raise: refused, named)
            raise ValueError(f"adapter {shown(req.lora_name)} could not be read: {type(e).__name__}.") from None
        routed = [n for n in adapter.weights if n.rsplit(".", 1)[0] in self.targets.experts]
        if routed and self.routed_refused is not None:
            raise ValueError(f"adapter {shown(req.lora_name)}: adapter_config.json target_parameters="
                             f"{shown(list(adapter.config.target_parameters))} (routed experts) is not supported with "
                             f"{self.routed_refused} yet (docs/lora.md#limits).")
        with self._lock:
            self._known[req.lora_int_id] = req
        return req
