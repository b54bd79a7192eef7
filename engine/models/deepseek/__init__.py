"""The DeepSeek-V3 family: DeepSeek-V3/R1, Kimi K2 (and K2.5's text model), Mistral Large 3 (DeepSeek-V3 format),
DeepSeek-V2 / V2-Lite, DeepSeek-V3.2 and GLM-5 (sparse attention), GLM-4.5 / 4.6: its architecture entries
(config.py) and config reader (reader.py); its layers are the built-in block kinds. Imports nothing: engine/config
reads the family's config modules (engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
