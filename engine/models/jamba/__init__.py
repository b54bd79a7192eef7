"""Jamba (AI21's Jamba v0.1, Jamba 1.5 Mini / Large, Jamba 1.7: JambaForCausalLM): Mamba1 layers (the shared "mamba1"
kind, engine/models/mamba1.py) interleaved with GQA layers without positional embedding (attn_layer_period /
attn_layer_offset), routed-expert FFNs interleaved with dense ones (expert_layer_period / expert_layer_offset): its
architecture entry (config.py) and config reader (reader.py); its checkpoint names map onto the shared blocks by
ArchSpec aliases (no kinds of its own). Imports nothing: engine/config reads the family's config modules
(engine/config/families.py). Its tiny checkpoints (`moelink make-tiny-model --arch jamba`): tiny.py."""
