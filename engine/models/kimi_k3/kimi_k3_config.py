"""What Kimi K3 adds to Kimi Linear's config.json fields, validated (no torch): its reader checks them when the
config is read, its block kinds (kinds.py) build from them. transformers (5.24) has no Kimi K3 class: the fields
are read from its text_config as transformers' KimiLinearConfig keeps them (unknown keys are kept as they are)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ...config.refusals import unsupported


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise unsupported(name, v, "a positive integer")
    return v


@dataclass(frozen=True)
class KimiK3Fields:
    """attn_res_block_size: layers per attention-residual block (a layer i with i % size == 0 opens one);
    latent_size: the routed experts' width (routed_expert_hidden_size), latent_norm: RMSNorm on their summed
    output before the up projection (latent_moe_use_norm); situ_beta / situ_linear_beta: SiTU's constants."""

    attn_res_block_size: int
    latent_size: int
    latent_norm: bool
    activation: str  # "situ" (config.json's hidden_act, K3's) or "silu": every MLP's, experts' and shared ones'
    situ_beta: float
    situ_linear_beta: float | None

    @classmethod
    def read(cls, d: Mapping[str, Any], hidden_size: int, num_layers: int) -> "KimiK3Fields":
        """From the text config's fields (`d`: transformers' config as a dict); a value moelink cannot run is refused
        naming the field."""
        block = _positive_int("attn_res_block_size", d.get("attn_res_block_size"))
        latent = _positive_int("routed_expert_hidden_size", d.get("routed_expert_hidden_size"))
        if latent > hidden_size:
            raise unsupported("routed_expert_hidden_size", latent, f"at most hidden_size ({hidden_size})")
        if block > num_layers:
            raise unsupported("attn_res_block_size", block, f"at most num_hidden_layers ({num_layers})")
        norm = d.get("latent_moe_use_norm", False)
        if not isinstance(norm, bool):
            raise unsupported("latent_moe_use_norm", norm, (True, False))
        act = d.get("hidden_act")
        if act not in ("situ", "silu"):
            raise unsupported("hidden_act", act, ("situ", "silu"), " for Kimi K3")
        beta = d.get("activation_situ_beta") or 1.0  # the peers' default (SGLang, vLLM, mlx-lm: `beta or 1.0`)
        linear = d.get("activation_situ_linear_beta")
        for name, v in (("activation_situ_beta", beta), ("activation_situ_linear_beta", linear)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise unsupported(name, v, "a number > 0" + (" or null" if name.endswith("linear_beta") else ""))
        if act == "silu":  # SiLU everywhere: SiTU's constants unused
            beta, linear = 1.0, None
        return cls(block, latent, norm, act, float(beta), None if linear is None else float(linear))


__all__ = ["KimiK3Fields"]
