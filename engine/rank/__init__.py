"""moelink.engine.rank: one rank: the `Worker` (device, process group, experts), its model runner and persistent batch, the step
inputs, sampler, CUDA graphs, device streams, start-up warm-up, and checkpoint loading (real or dummy weights). Its RL
calls (weight updates written in place, a trainer's broadcast, sleep, rollback) live in engine/rl/rank/, which counts
as this layer (tests/test_layering.py RL_RANK_PART); the Worker takes them from there.

Imports without Ray (the GPU image has none): tests/engine/test_rank_without_ray.py checks it.
Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.grammar, engine.lora.rank, engine.prompt_logprobs, engine.server, engine.spec, engine.tools.
"""
