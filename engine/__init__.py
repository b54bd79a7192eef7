"""moelink.engine: user-facing entry points (LLM, AsyncEngine, CLI)."""
from .outputs import CompletionOutput, Logprob, OutputKind, RequestOutput
from .sampling_params import SamplingParams


def __getattr__(name):
    # Lazy: `import moelink.engine` for SamplingParams should not load torch models.
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "AsyncEngine":
        from .async_engine import AsyncEngine
        return AsyncEngine
    if name == "EngineArgs":
        from .engine_args import EngineArgs
        return EngineArgs
    raise AttributeError(name)


__all__ = ["LLM", "AsyncEngine", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "OutputKind"]
