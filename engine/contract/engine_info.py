"""EngineInfo: the facts about a running engine that a front end (the gRPC server) reports or checks
against, fixed once the engine has started, so that it never reaches into the engine's internals."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config.model import ModelConfig


@dataclass(frozen=True)
class EngineInfo:
    model: ModelConfig
    max_model_len: int  # prompt + generated tokens of one request
    max_num_seqs: int  # requests running at once, per rank
    block_size: int  # tokens per KV block
    num_kv_blocks: int  # KV blocks of each rank's pool
    expert_parallel_size: int  # ranks (each runs attention for its own requests and holds 1/N of the experts)
    eos_token_ids: tuple[int, ...]  # sorted: config.json's and the tokenizer's, every id the engine stops on
    device: torch.device  # the device type every rank runs on
    load_format: str = "auto"  # "dummy": random weights, meaningless outputs (front ends say so at start-up)
    # Prefill/decode disaggregation (a router pairs compatible servers by these): the KV connector's name and
    # vLLM's kv_role ("kv_producer", "kv_consumer", "kv_both"; "" without a connector), the KV cache dtype.
    kv_connector: str = ""
    kv_role: str = ""
    kv_cache_dtype: str = "auto"
    # The checkpoint's sampling defaults (engine/config/generation_defaults.py): SamplingParams fields a request
    # leaves out; empty: SamplingParams' own (generation_config="vllm", or no generation_config.json).
    sampling_defaults: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "block_size", "num_kv_blocks", "expert_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EngineInfo.{name}={value!r} is invalid: must be a positive integer.")
        if list(self.eos_token_ids) != sorted(set(self.eos_token_ids)):
            raise ValueError(f"EngineInfo.eos_token_ids={self.eos_token_ids!r} is invalid: "
                             "must be sorted and distinct.")

    @property
    def device_name(self) -> str:
        """"cpu", or "cuda (<GPU name>)" as ModelInfo reports it."""
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return str(self.device.type)
