"""moelink.engine: the user-facing engine: `LLM` (offline), `AsyncEngine` (serving), the `moelink` CLI.

Owns: engine arguments and configs, the engine loop (tokenizer, scheduler, executor, output processing),
executors (in-process, Ray), the worker and its model runner, model definitions (`models/`), checkpoint
loading, sampling, CUDA graphs, metrics. Scheduling policy belongs to scheduler/, the MoE layer to moe/.
The gRPC front (`server/`) sits on top of this folder; only `cli.py`, the composition root of the `moelink`
command, reaches up into it to register `serve` and `stats`.
Must not import: benchmarks, engine.server (except cli.py, the composition root).
"""
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
