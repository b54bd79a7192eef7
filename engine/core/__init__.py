"""moelink.engine.core: the engine core: `LLMEngine`'s step loop driving the scheduler and an executor, request intake
(validation, tokenization, structured-output grammars) and output processing (detokenization, stop strings,
logprobs), engine metrics.

It drives ranks only through an `Executor` (cluster/) and the typed calls of contract/worker_api.py; it never
imports the rank side (worker, model runner, models).
Must not import: benchmarks, engine, engine.api, engine.grammar, engine.kv_transfer, engine.lora.rank, engine.models, engine.prompt_logprobs, engine.rank, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools, engine.tp.
"""
