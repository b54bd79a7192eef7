"""RL rollouts (docs/rl.md): what a trainer asks of the engine beside generation. Weight updates while serving: the
driver's checks here (`weights.py`), the trainer's end of a weight broadcast (`trainer.py`), the engine's control
calls in engine/core/rl_control.py, the in-place write on every rank in the rank's loader
(engine/rank/loader.update_in_place) and its receive in engine/rank/weight_sync.py; prompt logprobs and
routed experts are the ranks' (engine/prompt_logprobs/scoring.py, routed_experts.py).

Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.grammar, engine.kv_transfer, engine.lora, engine.lora.rank, engine.models, engine.multimodal, engine.prompt_logprobs, engine.rank, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools.
"""
