"""LoRA on a rank: the step plug-in (`plugin.py`) that finds an adapter's targets in the loaded model, holds each
request's slot and runs a step's slot writes and per-token slots (engine/contract/step_plugin.py). Above the models
(their targets) and the rest of engine/lora/ (the slots, the hooks); the cluster hands it to the ranks.

Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.grammar, engine.kv_transfer, engine.multimodal, engine.prompt_logprobs, engine.rank, engine.rl, engine.server, engine.spec, engine.spec.heads, engine.tools.
"""
