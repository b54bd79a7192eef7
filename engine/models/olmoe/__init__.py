"""OLMoE (allenai/OLMoE-1B-7B and its -Instruct): its architecture entry (config.py) and config reader (reader.py);
its layers are the built-in block kinds (GQA with q/k RMSNorm over all heads at once, MiniMax-M2's, and an optional
q/k/v clamp; softmax top-k routed experts in every layer). Imports nothing: engine/config reads the family's config
modules (engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
