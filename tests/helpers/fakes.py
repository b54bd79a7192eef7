"""Small typed stand-ins for real interfaces, for tests that call one piece without the rest."""
from __future__ import annotations

from dataclasses import dataclass, field

import grpc


@dataclass
class CallDetails(grpc.HandlerCallDetails):
    """grpc.HandlerCallDetails as a server interceptor's intercept_service(continuation, details) gets it."""

    method: str
    invocation_metadata: tuple = ()


@dataclass
class KernelsName:
    """What the model runner reads of its kernels backend to decide on CUDA graphs: its name."""

    name: str


@dataclass
class StopParams:
    """The SamplingParams fields Request.from_sampling_params reads (a scheduler test without the engine)."""

    max_tokens: int | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
