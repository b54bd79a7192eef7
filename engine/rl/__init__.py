"""RL rollouts (docs/rl.md): what a trainer asks of the engine beside generation. Weight updates while serving: the
driver's checks here (`weights.py`), the in-place write on every rank in the rank's loader
(engine/rank/loader.update_in_place); prompt logprobs and
routed experts are the ranks' (engine/rank/prompt_logprobs.py, routed_experts.py).

Must not import: benchmarks, engine, engine.api, engine.cluster, engine.contract, engine.core, engine.kv_transfer, engine.models, engine.multimodal, engine.rank, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools, engine.tp.
"""
