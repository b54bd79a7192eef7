"""Kimi K3's block kinds (engine/models/blocks/registry.py imports this module): the residual, embedding and head
kinds "attn_res" (attn_res.py: block attention residuals) and the FFN kind "latent_shared" (latent_moe.py: routed
experts in a latent space beside the shared ones). Its attention kinds are the shared "kda" and "mla"."""
from __future__ import annotations

from . import attn_res, latent_moe  # noqa: F401  (register the kinds)
