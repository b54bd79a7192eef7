"""Kimi K3 (Moonshot AI): Kimi Linear's hybrid of Kimi Delta Attention and NoPE MLA, with block attention residuals,
a latent MoE and the SiTU activation (docs/models.md, Kimi K3)."""
