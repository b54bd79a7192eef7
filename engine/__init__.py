"""moelink.engine: the user-facing engine: `LLM` (offline), `AsyncEngine` (serving), the `moelink` CLI.

The engine floor, one sub-package per role, top to bottom (tests/test_layering.py holds the table):
`server/` the gRPC front; `api/` LLM, AsyncEngine and the `moelink` command (its cli.py, the composition
root, alone reaches up into server/ to register `serve` and `stats`); `core/` the step loop, request intake
and outputs; `cluster/` executors, Ray, the EP group and its transitions; `rank/` one rank's worker, model
runner, sampler, CUDA graphs and loader; `models/` the decoder; `tools/` offline checkpoint tools;
`contract/` what driver and ranks exchange; `config/` configuration. Scheduling policy belongs to
scheduler/, the MoE layer to moe/. This root only re-exports the public names.
Must not import: benchmarks, engine.cluster, engine.grammar, engine.kv_transfer, engine.lora, engine.lora.rank, engine.models, engine.multimodal, engine.prompt_logprobs, engine.rank, engine.rl, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools, engine.tp.
"""
from .core.outputs import CompletionOutput, Logprob, OutputKind, RequestOutput
from .contract.lora import LoRARequest
from .contract.sampling_params import SamplingParams


def __getattr__(name):
    # Lazy: `import moelink.engine` for SamplingParams should not load torch models.
    if name == "LLM":
        from .api.llm import LLM
        return LLM
    if name == "AsyncEngine":
        from .api.async_engine import AsyncEngine
        return AsyncEngine
    if name == "EngineArgs":
        from .config.engine_args import EngineArgs
        return EngineArgs
    raise AttributeError(name)


__all__ = ["LLM", "AsyncEngine", "EngineArgs", "SamplingParams", "LoRARequest", "RequestOutput", "CompletionOutput", "Logprob", "OutputKind"]
