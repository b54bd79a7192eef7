"""The requests the engine holds back while their LoRA adapter is read (engine/lora/loader.py, off the step loop): kept
here, outside every scheduler, so that they take no KV block and no place in a waiting queue (the requests behind
them are scheduled as usual, the running ones step on); each goes to its scheduler once its adapter is in host memory,
or ends with finish_reason "error" and the read's error (naming the adapter) as its stop_reason when the read fails.
"""
from __future__ import annotations

from typing import Callable, Generic, Protocol, TypeVar

from moelink.scheduler.engine_output import EngineCoreOutput

from ..contract.lora import LoRARequest
from .loader import AdapterLoader

# How long a step with only held requests left waits for a read to end (it would otherwise spin on empty steps).
IDLE_WAIT_S = 0.05


class HeldRequest(Protocol):
    """What admission reads of a request (the engine's ProcessedRequest: engine/core/input_processing.py, named here by
    what it has, the driver's core being above this package)."""

    @property
    def request_id(self) -> str: ...

    @property
    def lora(self) -> LoRARequest | None: ...


R = TypeVar("R", bound=HeldRequest)


class LoRAAdmission(Generic[R]):
    """Requests waiting for their adapter's read, by request id (the engine thread's; the reads end on the loader's).
    `R`: the engine's request type, handed back as it came to `schedule`."""

    def __init__(self, loader: AdapterLoader):
        self.loader = loader
        self.waiting: dict[str, R] = {}
        # Adapters whose read started, for the ranks of other processes to read ahead too (`take_started`).
        self.started: dict[int, LoRARequest] = {}

    def hold(self, req: R) -> bool:
        """Whether `req` waits for its adapter's read (started now if not yet); False: schedule it now."""
        if req.lora is None or self.loader.request(req.lora):
            return False
        self.waiting[req.request_id] = req
        self.started[req.lora.lora_int_id] = req.lora
        return True

    def take_started(self) -> tuple[LoRARequest, ...]:
        """The adapters whose read started since the last call (SchedulerOutput.lora_prefetch)."""
        started, self.started = tuple(self.started.values()), {}
        return started

    def admit(self, schedule: Callable[[R], None], wait: bool = False) -> list[EngineCoreOutput]:
        """Schedule the requests whose adapter was read since (`schedule`: the engine's add), in arrival order; end
        those whose read failed. `wait`: nothing else to do, so wait briefly for a read to end. Returns the ended
        requests' outputs."""
        if not self.waiting:
            return []
        ended = self.loader.poll(IDLE_WAIT_S if wait else 0.0)
        if not ended:
            return []
        errors = {req.lora_int_id: error for req, error in ended}
        outputs = []
        for rid, req in list(self.waiting.items()):
            lora_id = req.lora.lora_int_id if req.lora is not None else 0
            if lora_id not in errors:
                continue
            del self.waiting[rid]
            error = errors[lora_id]
            if error is None:
                schedule(req)
            else:
                outputs.append(EngineCoreOutput(rid, finish_reason="error", stop_reason=error))
        return outputs

    def drop(self, request_ids) -> list[str]:
        """Forget held requests (aborted); returns the ids it held."""
        return [rid for rid in request_ids if self.waiting.pop(rid, None) is not None]

    def shutdown(self) -> None:
        self.waiting.clear()
        self.loader.shutdown()
