"""moelink.engine.state: the per-sequence layer state, one feature package (issue 56).

Layers that keep a state per sequence instead of (or beside) paged KV (gated DeltaNet's conv and recurrent states,
DeepSeek-V4's window and compressor rings) read and write it through two things defined here: `cache.StateCaches`,
a rank's state pools indexed by the slots the scheduler hands out (scheduler/hybrid_cache.py), with the copies a
prefix hit or a checkpoint save owes, and `step.StateStep`, what one forward tells those layers (each sequence's
slot, whether it continues a state, a verify step's split), built from a step's `cache.StatePlan`. The models read a
StateStep; the rank's runner builds the plan and owns the pools; nothing here runs a model.
Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.grammar, engine.kv_transfer, engine.lora, engine.lora.rank, engine.models, engine.multimodal, engine.prompt_logprobs, engine.rank, engine.rl, engine.server, engine.spec, engine.spec.heads, engine.tools.
"""
