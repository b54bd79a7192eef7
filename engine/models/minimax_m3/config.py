"""MiniMax-M3's registry entries (engine/config/architectures.py gathers them). No torch."""
from __future__ import annotations

from ...config.arch_spec import ArchSpec, Architecture

# The published names: per-expert w1 / w3 / w2 under block_sparse_moe, the correction bias beside the router
# (block_sparse_moe.e_score_correction_bias), the shared expert at block_sparse_moe.shared_experts.{gate,up,down}_proj,
# the indexer beside the attention's projections (self_attn.index_{q,k}_proj / index_{q,k}_norm). transformers 5's
# own names (save_original_format=False; what MiniMaxM3VLForCausalLM writes) read through the aliases.
SPEC = ArchSpec("block_sparse", moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"),
                correction_bias="e_score_correction_bias",
                weight_aliases=(("mlp.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),
                                ("self_attn.index_q_proj.weight", "self_attn.indexer.q_proj.weight"),
                                ("self_attn.index_k_proj.weight", "self_attn.indexer.k_proj.weight"),
                                ("self_attn.index_q_norm.weight", "self_attn.indexer.q_norm.weight"),
                                ("self_attn.index_k_norm.weight", "self_attn.indexer.k_norm.weight")),
                unread_prefixes=("model.mtp.",), checkpoint="minimax_m3")

ARCHITECTURES = (
    # The text model (transformers' MiniMaxM3VLForCausalLM, model_type minimax_m3_vl_text).
    Architecture("MiniMaxM3VLForCausalLM", SPEC, model_type="minimax_m3_vl_text"),
    # vLLM's name of the text model alone (its text-only checkpoint: config.json the text_config's fields, the
    # tensors under model. and lm_head, in the published names above).
    Architecture("MiniMaxM3SparseForCausalLM", SPEC, model_type="minimax_m3_vl_text",
                 alias_of="MiniMaxM3VLForCausalLM"),
)

# The multimodal checkpoint (model_type minimax_m3_vl) serves its text model: transformers 5.24 names its class
# MiniMaxM3SparseForConditionalGeneration (what its save_pretrained writes), the release MiniMaxM3VLForConditionalGeneration;
# the text model's tensors under language_model.model., its head at language_model.lm_head.
TEXT_MODELS = {"MiniMaxM3SparseForConditionalGeneration": ("MiniMaxM3VLForCausalLM", "language_model.model."),
               "MiniMaxM3VLForConditionalGeneration": ("MiniMaxM3VLForCausalLM", "language_model.model.")}
