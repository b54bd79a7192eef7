"""Jamba's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import gqa, rope_config
from ..mamba1_config import Mamba1Config


def _period(hf, period_name: str, offset_name: str) -> tuple[int, int]:
    period, offset = getattr(hf, period_name, None), getattr(hf, offset_name, None)
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise unsupported(period_name, period, "an integer >= 1")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < period:
        raise unsupported(offset_name, offset, f"an integer in [0, {period_name}={period})")
    return period, offset


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Jamba as transformers 5.24 builds it (JambaForCausalLM): layer i is GQA attention when i % attn_layer_period
    == attn_layer_offset, else Mamba1 (JambaMambaMixer: engine/models/mamba1.py, mamba_expand * hidden_size channels,
    mamba_d_state, mamba_d_conv, mamba_dt_rank, the conv's bias when mamba_conv_bias, RMSNorms on dt, B and C); the
    attention has no positional embedding at all (no rotary) and no biases; layer i's FFN is routed when i %
    expert_layer_period == expert_layer_offset (num_experts experts of intermediate_size: softmax over every
    expert in float32, the top num_experts_per_tok, not renormalized), else a dense SiLU MLP of intermediate_size."""
    n = c["num_layers"]
    ap, ao = _period(hf, "attn_layer_period", "attn_layer_offset")
    ep, eo = _period(hf, "expert_layer_period", "expert_layer_offset")
    attn_layers = tuple(i for i in range(n) if i % ap == ao)
    if not attn_layers:
        raise unsupported("attn_layer_offset", ao, f"below num_hidden_layers={n}: at least one attention layer "
                                                   f"(a Jamba of Mamba layers alone is not built)")
    E = getattr(hf, "num_experts", None)
    if isinstance(E, bool) or not isinstance(E, int) or E < 2:
        raise unsupported("num_experts", E, "an integer >= 2", f" for {arch} (a Jamba without routed layers is not "
                                                               f"built)")
    sparse = tuple(i for i in range(n) if i % ep == eo)
    if not sparse:
        raise unsupported("expert_layer_offset", eo, f"below num_hidden_layers={n}: at least one routed layer")
    if getattr(hf, "mamba_proj_bias", False):
        raise unsupported("mamba_proj_bias", True, (False,), f" for {arch}")
    expand = getattr(hf, "mamba_expand", None)
    if isinstance(expand, bool) or not isinstance(expand, int) or expand < 1:
        raise unsupported("mamba_expand", expand, "an integer >= 1")
    # Mamba1Config checks each size (mamba_d_state, mamba_d_conv, mamba_dt_rank) with a sentence naming it.
    mamba = Mamba1Config(expand * c["hidden_size"], getattr(hf, "mamba_d_state", None),
                         getattr(hf, "mamba_d_conv", None), getattr(hf, "mamba_dt_rank", None),
                         conv_bias=bool(getattr(hf, "mamba_conv_bias", True)), inner_norms=True,
                         norm_eps=float(c["rms_norm_eps"]))
    full = gqa(c, rope_config(rope, c, c["head_dim"]), nope_layers=tuple(range(n)))
    inter = int(hf.intermediate_size)
    router = RouterConfig(E, c["top_k"], norm_topk_prob=False)
    return dict(num_experts=E, moe_intermediate_size=inter, intermediate_size=inter, norm_topk_prob=False,
                sparse_layers=sparse, moe=MoEConfig(router), attention=full,
                layer_attention=tuple(full if i in attn_layers else mamba for i in range(n)))


__all__ = ["read"]
