"""PhiMoE (Phi-3.5-MoE): its architecture entries (config.py), config reader (reader.py) and block kinds (kinds.py:
the prenorm layer and the final norm with LayerNorms that have a bias, the LM head's bias); its routing is the
router kind "sparsemixer" (moe/router.py SparseMixerRouter). Its tiny checkpoints (`moelink make-tiny-model
--arch`): tiny.py."""
