"""Granite-MoE (ibm-granite/granite-3.0-1b-a400m, -3b-a800m, granite-3.1 MoE) and Granite-MoE with a shared expert
(GraniteMoeSharedForCausalLM) and Granite 4.0-H (GraniteMoeHybridForCausalLM: Mamba2 layers, the shared "mamba2"
kind, beside GQA ones): their architecture entries (config.py), config reader (reader.py) and block kinds
(kinds.py: the fused experts' and shared MLP's names, and the muP multipliers folded into the weights at load).
Imports nothing: engine/config reads the family's config modules (engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
