"""moelink.engine.tools: offline checkpoint tools of the `moelink` command: tiny random checkpoints in the Hugging Face layout (each
family's presets in its engine/models/<family>/tiny.py, counted in this floor), the built-in model and its training,
the FP8 and MXFP4 quantizers.

They write checkpoints the engine loads; the engine core never imports them.
Must not import: benchmarks, engine, engine.api, engine.cluster, engine.contract, engine.core, engine.grammar, engine.kv_transfer, engine.lora, engine.lora.rank, engine.models, engine.multimodal, engine.prompt_logprobs, engine.rank, engine.rl, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tp.
"""
