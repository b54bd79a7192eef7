"""ERNIE-4.5-MoE (baidu/ERNIE-4.5-21B-A3B, -300B-A47B; their -PT checkpoints): its architecture entry (config.py),
config reader (reader.py) and checkpoint kind (kinds.py: the correction bias stored [1, E]); its layers are the
built-in block kinds (GQA with an interleaved rope, de-interleaved at load; softmax routing selected with a
correction bias, shared experts, dense layers outside moe_layer_start_index..end_index). Imports nothing:
engine/config reads the family's config modules (engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
