"""What names a LoRA adapter on a request, from the API to the ranks (vLLM's `LoRARequest`): the driver validates
it against the checkpoint (engine/lora/adapter.py), the scheduler keys the prefix cache and the adapter slots by
it, and each rank loads its weights into a device slot (engine/lora/slots.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter as published by peft: a directory holding adapter_config.json and adapter_model.safetensors.
    `lora_int_id` identifies it (>= 1, as vLLM's); two requests with the same id must name the same adapter."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest.lora_name={self.lora_name!r} is invalid: must be a non-empty string.")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id={self.lora_int_id!r} is invalid: must be an integer >= 1.")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"LoRARequest.lora_path={self.lora_path!r} is invalid: must be an adapter directory.")

    @property
    def cache_salt(self) -> bytes:
        """The request's prefix-cache salt (scheduler Request.cache_salt): KV computed under one adapter is never
        read under another, nor under the base model."""
        return b"lora:" + str(self.lora_int_id).encode() + b":" + self.lora_name.encode()
