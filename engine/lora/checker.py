"""The driver's check of a request's adapter, before any rank reads it: read once per adapter id (its config and
tensors against the served checkpoint's headers: engine/lora/adapter.py), then remembered."""
from __future__ import annotations

import threading

from ..config.lora import LoRAConfig
from ..contract.lora import LoRARequest
from .adapter import model_targets, read_adapter


class AdapterChecker:
    """Checks LoRARequests against `model_dir`'s checkpoint under `limits`; thread-safe (requests are processed on
    many threads)."""

    def __init__(self, limits: LoRAConfig, model_dir: str, routed_refused: str | None = None):
        """routed_refused: the flag under which routed-expert adapters are refused ("eplb_interval=8": experts move
        between ranks, their A / B would have to follow; engine/config/lora.py routed_lora_refusal); None: served."""
        self.limits = limits
        self.targets = model_targets(model_dir)
        self.routed_refused = routed_refused
        self._known: dict[int, LoRARequest] = {}
        self._lock = threading.Lock()

    def check(self, req: object) -> LoRARequest:
        """`req` as a checked LoRARequest; ValueError naming the field otherwise."""
        if not isinstance(req, LoRARequest):
            raise ValueError(f"lora_request={req!r} is invalid: must be a LoRARequest(lora_name, lora_int_id, "
                             "lora_path) or None.")
        with self._lock:
            known = self._known.get(req.lora_int_id)
        if known is not None:
            if known != req:
                raise ValueError(f"LoRARequest.lora_int_id={req.lora_int_id} is invalid: it already names adapter "
                                 f"{known.lora_name!r} at {known.lora_path!r}; give each adapter its own id.")
            return req
        adapter = read_adapter(req, self.limits, self.targets, load=False)  # headers only: the ranks read the weights
        routed = [n for n in adapter.weights if n.rsplit(".", 1)[0] in self.targets.experts]
        if routed and self.routed_refused is not None:
            raise ValueError(f"adapter {req.lora_name!r}: adapter_config.json target_parameters="
                             f"{list(adapter.config.target_parameters)!r} (routed experts) is not supported with "
                             f"{self.routed_refused} yet (docs/lora.md#limits).")
        with self._lock:
            self._known[req.lora_int_id] = req
        return req
