"""GLM-5.3-Flash's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # GLM-5.3-Flash's text model (transformers' Glm5NextTextModel, reader.py): Kimi Delta Attention on three layers
    # of four (Kimi Linear's names under self_attn), NoPE MLA with GLM-5's DSA indexer over pools of tokens on the
    # fourth, hyper-connection streams around every block (hc_attn_* / hc_ffn_*, the head a plain mean), DeepSeek-V3
    # routing over clamped-SwiGLU experts (per expert as save_pretrained writes them back) and a shared expert; its MTP
    # layer (layers.{num_hidden_layers}.*, text_config's num_nextn_predict_layers) is read by speculative method "mtp"
    # only, in the layout "glm5_next" (mtp.py: vLLM's and SGLang's structure).
    Architecture("Glm5NextForCausalLM", ArchSpec("mla", moe_prefix="mlp", expert_names=PROJ, residual="hc_prenorm",
                                                 embedding="hc_streams", head="hc_mean"),
                 model_type="glm5_next_text", mtp_layers=True, mtp_layout="glm5_next"),
)
# Published as a multimodal checkpoint (Glm5NextForConditionalGeneration): the text model under model.language_model.,
# the lm_head at the top level, a vision tower moelink does not read (images are refused: engine/server/serving.py).
TEXT_MODELS = {"Glm5NextForConditionalGeneration": ("Glm5NextForCausalLM", "model.language_model.")}
