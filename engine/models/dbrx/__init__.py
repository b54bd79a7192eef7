"""DBRX (databricks/dbrx-base, dbrx-instruct): its architecture entry (config.py), config reader (reader.py) and
block kinds (kinds.py: LayerNorm without bias around every block and at the end, and DBRX's own checkpoint names:
the fused Wqkv, the experts stored fused as w1 / v1 / w2 [E * I, D], mapped onto moelink's stacks at load). Its
attention is GQA with clip_qkv (GQAConfig.clip_qkv). Imports nothing: engine/config reads the family's config modules
(engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
