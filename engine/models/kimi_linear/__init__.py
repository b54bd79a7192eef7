"""Kimi Linear (Moonshot): Kimi Delta Attention layers (linear attention with a decay per key channel, per-sequence
states) interleaved with MLA layers without rotary, DeepSeek-V3's routed MoE with a shared expert: its registry entry
(config.py), config reader (reader.py) and tiny model (tiny.py); its layers are shared block kinds ("kda", "mla")."""
