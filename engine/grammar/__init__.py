"""Structured output on a rank (`response_format`, `structured_outputs`, tool calls' schemas): the step plug-in
(`step_plugin.py`) that hands a step's sampling the allowed tokens of each constrained request. The driver half
(compiling grammars, advancing each request's matcher, the bitmask of its next token) is engine/core's
(structured_output.py, grammar_compile.py); the scheduler carries its bitmasks to the ranks
(SchedulerOutput.grammar_bitmask).

Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.kv_transfer, engine.lora, engine.lora.rank, engine.models, engine.multimodal, engine.prompt_logprobs, engine.rank, engine.rl, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools, engine.tp.
"""
