"""Small typed stand-ins for real interfaces, for tests that call one piece without the rest.

Standard library only: kernel and scheduler tests import it, and they run where grpc is absent (the GPU image).
The gRPC stand-in (CallDetails) lives in tests/helpers/grpc_server.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NoMetricsEngine:
    """What MoelinkServer reads of an AsyncEngine before anything else: its metrics sink (None: made without)."""

    metrics: object = None


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
