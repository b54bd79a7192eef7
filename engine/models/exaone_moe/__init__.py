"""EXAONE-MoE (LG AI Research's K-EXAONE): GQA with per-head q/k norms, sliding-window layers with rotary and
full-attention layers without (global NoPE), DeepSeek-V3's routed MoE with a shared expert."""
