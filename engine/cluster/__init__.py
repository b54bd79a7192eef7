"""moelink.engine.cluster: the cluster: executors that run a step on every rank (in-process, Ray), the Ray runtime and its clean-up guard,
the EP group's membership (`EPGroup`) and its transitions: elastic loss, rejoin, online EPLB moves. (The KV connectors
that move KV between engines live in engine/kv_transfer, below the runner.)

Ray is imported here and above only; the rank side below imports without it.
Must not import: benchmarks, engine, engine.api, engine.core, engine.models, engine.server, engine.spec.heads, engine.state, engine.tools, engine.tp.
"""
