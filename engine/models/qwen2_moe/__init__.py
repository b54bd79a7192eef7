"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): its architecture entry (config.py) and config reader (reader.py);
its layers are the built-in block kinds (GQA with q/k/v biases; routed experts beside one shared expert behind a
sigmoid gate, Qwen3-Next's FFN). Imports nothing: engine/config reads the family's config modules
(engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
