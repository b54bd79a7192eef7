"""HunYuan-MoE-V1 (tencent/Hunyuan-A13B-Instruct): its architecture entry (config.py) and config reader (reader.py);
its layers are the built-in block kinds (GQA whose per-head q/k RMSNorm follows the rotary: GQAConfig.
qk_norm_after_rope; softmax top-k routed experts, renormalised, beside one ungated shared MLP in every layer).
Imports nothing: engine/config reads the family's config modules (engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
