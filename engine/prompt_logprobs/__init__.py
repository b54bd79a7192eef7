"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs`) as a step plug-in: `scoring.py` plans a step's prompt
positions and scores them on the device, `plugin.py` joins that to the rank's step (engine/contract/step_plugin.py).
On the contract; the cluster hands it to the ranks (engine/cluster/step_features.py).

Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.grammar, engine.kv_transfer, engine.lora, engine.lora.rank, engine.models, engine.multimodal, engine.rank, engine.rl, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools.
"""
