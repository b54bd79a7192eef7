"""AFMoE (Arcee's Trinity: arcee-ai/Trinity-Mini, -Nano, -Large): its architecture entry (config.py), config reader
(reader.py) and block kinds (kinds.py: the layer's four norms around attention and FFN, the muP embedding scale, the
attention's output gate read from its own gate_proj). Its attention is GQA with per-head q/k norm, a gated output
(GQAConfig.output_gate), rotary and a sliding window on the sliding layers only (the full layers are NoPE); its FFN
DeepSeek-V3-style sigmoid routing with a correction bias beside shared experts, after dense leading layers.
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
