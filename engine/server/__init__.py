"""moelink.engine.server: the gRPC front: `moelink.v1` and `vllm.grpc.engine.VllmEngine` over one
`AsyncEngine`, with health, reflection, auth, TLS, request limits, admission and drain.

It talks to the engine through `AsyncEngine` only. Benchmarks that load it (bench-serve) live above it.
It reaches the engine through `AsyncEngine` (api/) and the core's request and output types.
Must not import: benchmarks, engine.cluster, engine.grammar, engine.kv_transfer, engine.lora.rank, engine.models, engine.prompt_logprobs, engine.rank, engine.spec, engine.spec.heads, engine.state, engine.tp.
"""