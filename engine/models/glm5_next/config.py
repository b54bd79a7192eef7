"""GLM-5.3-Flash's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

# Speculative method "mtp" (engine/config/speculative.py names this reason): the release ships one MTP layer after the
# last decoder layer, but the locked transformers shows only its names, so moelink builds none rather than guess.
_MTP_REFUSED = ("its MTP layer (layers.45.*, with a shared_head) is not built by transformers 5.24 (Glm5NextTextModel "
                "ignores layers.45. and shared_head, Glm5NextTextConfig names no count), so its attention kind (KDA or "
                "NoPE MLA with the DSA indexer) and how it meets the main model's hyper-connection streams are "
                "unknown; moelink does not guess them.")

ARCHITECTURES = (
    # GLM-5.3-Flash's text model (transformers' Glm5NextTextModel, reader.py): Kimi Delta Attention on three layers
    # of four (Kimi Linear's names under self_attn), NoPE MLA with GLM-5's DSA indexer over pools of tokens on the
    # fourth, hyper-connection streams around every block (hc_attn_* / hc_ffn_*, the head a plain mean), DeepSeek-V3
    # routing over clamped-SwiGLU experts (per expert as save_pretrained writes them back) and a shared expert.
    Architecture("Glm5NextForCausalLM", ArchSpec("mla", moe_prefix="mlp", expert_names=PROJ, residual="hc_prenorm",
                                                 embedding="hc_streams", head="hc_mean"),
                 model_type="glm5_next_text", mtp_refused=_MTP_REFUSED),
)
# Published as a multimodal checkpoint (Glm5NextForConditionalGeneration): the text model under model.language_model.,
# the lm_head at the top level, a vision tower moelink does not read (images are refused: engine/server/serving.py).
TEXT_MODELS = {"Glm5NextForConditionalGeneration": ("Glm5NextForCausalLM", "model.language_model.")}
