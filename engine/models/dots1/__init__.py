"""dots.llm1 (rednote-hilab/dots.llm1.base, .inst): its architecture entry (config.py) and config reader (reader.py);
its layers are the built-in block kinds (Qwen3's GQA with per-head q/k RMSNorm, sliding layers where layer_types
makes them; DeepSeek-V3's routing, shared experts and leading dense layers). Imports nothing: engine/config reads
the family's config modules (engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
