"""Sarvam-MoE (sarvamai/sarvam-30b): its architecture entry (config.py), config reader (reader.py) and checkpoint kind
(kinds.py: the published names, q/k/v fused in attention.query_key_value); its layers are the built-in block kinds
(GLM-4.5's: GQA with per-head q/k norm over a whole-head rotary, DeepSeek-V3's routing, shared experts, leading dense
layers), as transformers 5.24 runs it (its Glm4MoeForCausalLM on a SarvamMoEConfig). Imports nothing: engine/config
reads the family's config modules (engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
