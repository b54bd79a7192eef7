"""Nemotron-H (NemotronHForCausalLM: NVIDIA Nemotron 3 Nano / Super, Nemotron-H): hybrid Mamba2 + attention + MoE,
every checkpoint layer a single block (layers_block_type / hybrid_override_pattern: "M" Mamba2, "*" attention,
"E" routed experts, "-" MLP). Its architecture entry (config.py), config reader (reader.py: the checkpoint layers
paired into engine layers), block kinds (kinds.py: the paired layer, the relu^2 FFNs, the latent MoE, the
`backbone.` names) and tiny checkpoints (tiny.py). Imports nothing: engine/config reads the family's config modules
(engine/config/families.py)."""
