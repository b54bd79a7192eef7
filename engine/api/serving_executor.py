"""`moelink serve`'s executor: at one rank, "auto" is the multiprocess executor (engine/cluster/mp_executor.py).

Why a server and not `LLM`: a server's front (HTTP, gRPC, streaming) and output thread take the interpreter lock
beside the step, so its forward waits for them unless the rank has a process of its own (docs/serving.md#the-rank-process);
`LLM.generate` runs nothing beside its step, and its in-process rank is what its callers reach (`llm.engine.executor`).
The rank is forked here when the server still has one thread (engine/cluster/mp_rank.py prefork), so it starts
with torch and the rank's modules imported; otherwise the executor exec's it.
"""
from __future__ import annotations


def choose_serving_executor(args) -> None:
    """Resolve EngineArgs.executor "auto" for a server (mp at one rank) and fork the rank process now when it is mp."""
    if args.executor == "auto" and max(args.expert_parallel_size, args.tensor_parallel_size) == 1:
        args.executor = "mp"
    if args.executor == "mp":
        from ..cluster.mp_rank import prefork

        prefork()


def discard_forked_rank() -> None:
    """End a rank forked by choose_serving_executor that no engine adopted (the engine failed to start)."""
    from ..cluster.mp_rank import discard_prefork

    discard_prefork()
