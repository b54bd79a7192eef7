"""moelink.engine.contract: the engine's contract: the values the driver and the ranks both import and exchange.

Sampling parameters and structured-output parameters, the expert-parallel plan (decided once) and the per-step
EP plan, the typed calls the driver makes on every rank (`worker_api`), the engine facts a front end reports,
and three process-wide helpers both sides use (log-safe text, the garbage-collector policy, the host/device copies
of `host_copy` that never make the host wait). Small and
torch-light: a module here holds data and pure functions, never a thread, a device or a Ray handle.
Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.grammar, engine.kv_transfer, engine.lora, engine.lora.rank, engine.models, engine.multimodal, engine.prompt_logprobs, engine.rank, engine.rl, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools.
"""
