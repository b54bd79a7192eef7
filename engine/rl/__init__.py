"""RL rollouts (docs/rl.md): all that a trainer asks of the engine beside generation, in one package.

The driver's side: the engine's control calls (`control.py`: weight updates from disk, from tensors and from a
trainer's broadcast, the trainer's group, pause / continue, weight versions, the prefix-cache flush), held by
LLMEngine as `engine.rl` and reaching the engine only through `host.RLHost`; sleep / wake_up (`memory.py`, held as
`engine.rl.memory`); what a failed update or a deep sleep left unwritten (`stale.py`); the refusals a server maps to
its statuses (`errors.py`); an update's checks against the served checkpoint (`weights.py`); the re-quantizers of a
trainer's float weights into the served format (`requantize.py`, `requantize_gptq_awq.py`); the trainer's end of a
weight broadcast (`trainer.py`).

The rank's side (`rank/`, a floor of engine/rank: tests/test_layering.py RL_RANK_PART): the Worker's RL calls
(`rank/worker.py`), the broadcast's receive (`rank/weight_sync.py`), sleep (`rank/sleep_mode.py`) and rollback
(`rank/rollback.py`); the in-place write itself is the rank's loader's (engine/rank/loader.update_in_place).
Routed experts and routing replay join each rank's step as plug-ins (`routed_experts.py`, `routing_replay.py`:
engine/contract/step_plugin.py), handed to the ranks by the cluster (engine/cluster/step_features.py).

Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.grammar, engine.kv_transfer, engine.lora, engine.lora.rank, engine.models, engine.multimodal, engine.prompt_logprobs, engine.rank, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools.
"""
