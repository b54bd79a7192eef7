"""The one decoder (moe_decoder.py) of registered block kinds (blocks/), its layers (gqa.py, mla.py, dsa.py,
gated_deltanet.py, linear.py, rope.py), each block kind's config beside its module (<module>_config.py: gqa_config.py,
mla_config.py, ...), the architecture registry's models side (registry.py: ARCHITECTURES, arch_spec) and one package
per model family (engine/models/<family>/: its registry entries, config reader, block kinds, tiny checkpoints and
multimodal rows; engine/config/families.py lists them). Imports nothing: engine/config imports the block kinds'
configs and the families' config modules, which sit under this package, before any model code.
Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.grammar, engine.kv_transfer, engine.lora.rank, engine.multimodal, engine.prompt_logprobs, engine.rank, engine.rl, engine.server, engine.spec, engine.spec.heads, engine.tools.
"""
