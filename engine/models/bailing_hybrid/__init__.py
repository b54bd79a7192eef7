"""Ling's hybrid (inclusionAI, bailing_hybrid): Kimi Delta Attention layers with full-rank gates and a bounded forget
gate, MLA layers with a per-head output gate, DeepSeek-V3's routed MoE with a shared expert: its registry entry
(config.py), config reader (reader.py), checkpoint kind (kinds.py: the published names) and tiny model (tiny.py)."""
