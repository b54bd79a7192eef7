"""moelink.engine.server: the gRPC front: `moelink.v1` and `vllm.grpc.engine.VllmEngine` over one
`AsyncEngine`, with health, reflection, auth, TLS, request limits, admission and drain.

It talks to the engine through `AsyncEngine` only. Benchmarks that load it (bench-serve) live above it.
Must not import: benchmarks.
"""