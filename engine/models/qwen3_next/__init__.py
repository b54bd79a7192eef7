"""Qwen3-Next and Qwen3.5-MoE's text model: their architecture entries (config.py) and config reader (reader.py);
their layers are the built-in block kinds (gated DeltaNet among them). Imports nothing: engine/config reads the
family's config modules (engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
