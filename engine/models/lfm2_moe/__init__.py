"""LFM2-MoE (LiquidAI/LFM2-8B-A1B, Lfm2MoeForCausalLM): its architecture entry (config.py), config reader
(reader.py) and block kinds (kinds.py: the FFN kind reading the experts per expert as published or fused as
transformers 5 writes them, and the checkpoint kind naming LFM2's tensors). Its layers: the shared "short_conv" kind
(engine/models/short_conv.py: LFM2's gated short convolution, its state in the state pools) beside GQA layers with
q/k RMSNorm; dense MLPs in the first num_dense_layers layers, then sigmoid-routed experts selected with an expert
bias. Imports nothing: engine/config reads the family's config modules (engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
