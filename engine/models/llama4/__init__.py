"""Llama 4 (meta-llama/Llama-4-Scout-17B-16E, Llama-4-Maverick-17B-128E; their -Instruct releases), text only: its
architecture entries (config.py: Llama4ForCausalLM, and the text model of the published Llama4ForConditionalGeneration
under language_model., its vision tower not read), config reader (reader.py) and block kinds (kinds.py: the MoE
block's fused [E, D, 2F] / [E, F, D] experts, its top-1 sigmoid router whose weight scales the expert's input, and the
shared expert). Its attention is GQA with Llama 4's options as GQAConfig facts: chunked local attention on the rope
layers (attention_chunk_size), NoPE layers with attention temperature tuning (temperature_tuning), the weightless L2
q/k norm ("l2") and the interleaved (complex) llama3-scaled rope. Imports nothing: engine/config reads the family's
config modules (engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
