"""Mellum (JetBrains' Mellum MoE): its architecture entry (config.py) and config reader (reader.py); its layers are the
built-in block kinds (Qwen3-MoE's GQA with per-head q/k norm, one rope per layer type, sliding layers where layer_types
makes them; softmax top-k routed experts, dense layers by mlp_layer_types). Imports nothing: engine/config reads the
family's config modules (engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
