"""Kimi K3's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import ArchSpec, Architecture

SPEC = ArchSpec("mla", moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"), residual="attn_res",
                ffn="latent_shared", embedding="attn_res", head="attn_res")

ARCHITECTURES = (
    # Kimi K3's text model (its text_config: model_type kimi_linear, read by transformers' KimiLinearConfig, which
    # keeps K3's own fields as they are; reader.py validates them): Kimi Linear's layers (KDA with a full-rank output
    # gate and the bounded forget gate, NoPE MLA with an element-wise output gate) wired by block attention residuals
    # ("attn_res": every layer's input a softmax mix of the finished blocks' sums; kinds.py), MoE layers whose routed
    # experts run in a latent space ("latent_shared": routed_expert_down_proj / _norm / _up_proj around them, the
    # router and the shared experts on the hidden states), every MLP SiTU-gated. The experts per expert under
    # block_sparse_moe (w1 / w3 / w2, Kimi Linear's names; in MXFP4 as published: compressed-tensors'
    # mxfp4-pack-quantized, weight_packed / weight_scale), the dense first layer under mlp.
    Architecture("KimiK3ForCausalLM", SPEC, model_type="kimi_linear", hidden_acts=("situ", "silu"), mxfp4_experts=True),
    # SGLang's name of K3's text model alone: a text-only checkpoint (config.json the text_config's fields, the text
    # model's tensors under model. and lm_head, in the names above).
    Architecture("KimiK3LinearForCausalLM", SPEC, model_type="kimi_linear", hidden_acts=("situ", "silu"),
                 mxfp4_experts=True, alias_of="KimiK3ForCausalLM"),
)
# Published as a multimodal checkpoint (KimiK3ForConditionalGeneration, model_type kimi_k3): the text model under
# language_model.model., its head language_model.lm_head, MoonViT and its projector (vision_tower., mm_projector.)
# not read (an image request is refused naming the text model: engine/server/serving.py).
TEXT_MODELS = {"KimiK3ForConditionalGeneration": ("KimiK3ForCausalLM", "language_model.model.")}
