"""moelink.engine.config: configuration: what a checkpoint is (config.json read through transformers, the one architecture registry,
quantization), every user-facing engine option (`EngineArgs` -> `EngineConfig`), and the per-concern configs made
from them (worker, CUDA graphs, timeouts, KV sizing).

Pure values and validation: nothing here starts a process, touches a device or imports the model. The model
families' registry entries and config readers (engine/models/<family>/config.py, reader.py) are this floor's
too: families.py lists them, architectures.py and hf_readers.py import them by name (tests/test_layering.py).
Must not import: benchmarks, engine, engine.api, engine.cluster, engine.contract, engine.core, engine.grammar, engine.kv_transfer, engine.lora, engine.lora.rank, engine.models, engine.multimodal, engine.prompt_logprobs, engine.rank, engine.rl, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools, engine.tp.
"""
