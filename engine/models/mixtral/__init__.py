"""Mixtral: its architecture entry (config.py) and config reader (reader.py); its layers are the built-in block
kinds. Imports nothing: engine/config reads the family's config modules (engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
