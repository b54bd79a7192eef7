"""The routed FFN kinds as config (ffn.py beside it: "routed", "routed_shared"; the layer itself is moe/layer.py):
how the MoE layers are laid out and routed, read from config.json by the families' readers; pure data, no kernel
module, no device."""
from __future__ import annotations

from dataclasses import dataclass

from moelink.moe.router_config import RouterConfig

from ...config.refusals import unsupported

# The experts' gated activations (kernels.moe.MoEActivation's kinds, and Kimi K3's SiTU: kernels/situ.py); "relu2"
# is Nemotron-H's ungated relu(up)^2 (engine/models/nemotron_h/kinds.py); "gelu_tanh" is Gemma 4's
# gelu_pytorch_tanh(gate) * up (its own MoEActivation: engine/models/gemma4/kinds.py).
MOE_ACTIVATIONS = ("silu", "swiglu_oai", "silu_clamp", "situ", "relu2", "gelu_tanh")


@dataclass(frozen=True)
class MoEConfig:
    """How the MoE layers are laid out and routed, beyond ModelConfig's num_experts and top_k.

    router: the routing scheme (moe.router.RouterConfig; `make_router(router)` builds it).
    n_shared_experts: always-on experts beside the routed ones in every MoE layer (DeepSeek, GLM), one dense
    MLP of n_shared_experts * moe_intermediate_size. first_k_dense_replace: the first k layers have a dense
    MLP. moe_layer_freq: every n-th layer after them is sparse; transformers implements 1 only, so that is all
    that is accepted.
    """

    router: RouterConfig
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    # gpt-oss: the router linear has a bias (router.bias), each expert has gate/up and down biases, and the
    # experts' gated activation is the clamped SwiGLU: "swiglu_oai" with swiglu_alpha / swiglu_limit (plain
    # data here, so reading a config loads no kernel module; the decoder builds kernels.moe.MoEActivation).
    router_bias: bool = False
    expert_bias: bool = False
    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # The shared MLP's width when the family names it apart (Qwen3-Next's shared_expert_intermediate_size); 0:
    # n_shared_experts * moe_intermediate_size. shared_expert_gate: its output is scaled by sigmoid(x . w) per token
    # (Qwen3-Next's shared_expert_gate, a [1, D] linear).
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    # Zero-computation experts (LongCat-Flash's zero_expert_num): the router scores this many more than the routed
    # experts, and a pick of one is the token itself times its weight (moe/layer.MoELayer): no weights, no traffic.
    zero_experts: int = 0
    # The gated activation of the dense layers' MLP and the shared experts, with the experts' swiglu_alpha /
    # swiglu_limit: MiniMax-M3's "swiglu_oai", GLM-5.3-Flash's "silu_clamp"; "silu" for every other family.
    dense_activation: str = "silu"
    # SiTU's constants (activation "situ", Kimi K3): config.json's activation_situ_beta and
    # activation_situ_linear_beta (None: the up half as it is); kernels.situ.SiTU validates them.
    situ_beta: float = 1.0
    situ_linear_beta: float | None = None
    # The routing weight multiplies the expert's input rather than its output (Llama 4's Llama4TextMoe: routed_in =
    # x * score; moe/layer.MoELayer weight_on_input), top-1 routing only.
    router_weight_on_input: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.router, RouterConfig):
            raise ValueError(f"MoEConfig router={self.router!r} must be a moelink.moe.router.RouterConfig.")
        for name in ("activation", "dense_activation"):
            if getattr(self, name) not in MOE_ACTIVATIONS:
                raise ValueError(f"MoEConfig {name}={getattr(self, name)!r} is invalid: allowed: "
                                 f"{', '.join(MOE_ACTIVATIONS)}.")
        for name in ("swiglu_alpha", "swiglu_limit"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise unsupported(name, v, "a number > 0")
        for name in ("n_shared_experts", "first_k_dense_replace", "shared_expert_intermediate_size", "zero_experts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise unsupported(name, v, "an integer >= 0")
        if self.router_weight_on_input and self.router.top_k != 1:
            raise unsupported("num_experts_per_tok", self.router.top_k, (1,),
                              " (the routing weight scales the expert's input: one pick per token)")
        if self.moe_layer_freq != 1:
            raise unsupported("moe_layer_freq", self.moe_layer_freq, (1,),
                              " (transformers puts experts in every layer from first_k_dense_replace on)")


__all__ = ["MOE_ACTIVATIONS", "MoEConfig"]
