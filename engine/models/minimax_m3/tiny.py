"""MiniMax-M3's tiny checkpoints: `moelink make-tiny-model --arch minimax_m3` (the multimodal checkpoint as the
release is laid out) and the test suite's (tests/engine/test_minimax_m3.py). Built by transformers' own classes and
drawn by engine/tools/tiny_families.save_drawn_preset (zero-centred norms and the correction bias random).

At these sizes 1-150-token prompts cross every boundary the engine cuts at: blocks of 4 positions with 4 kept
(2 of them local: the query's own and the one before), so from the 17th position on the indexer drops blocks; a
full-attention layer first and last, block-sparse ones between; a dense first MLP layer, then 6 experts (top-2,
sigmoid with a correction bias, routed_scaling_factor 2) beside one shared expert; GQA 4 / 2 with per-head q/k
norms and half of each head rotated; two index heads, each selecting for a group of two query heads.
"""
from __future__ import annotations

from ...tools.tiny_families import Preset, TinyArch, preset_writer, published_as

BLOCK, TOPK, LOCAL = 4, 4, 2
TEXT = dict(
    hidden_size=32, intermediate_size=16, dense_intermediate_size=48, shared_intermediate_size=16,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    num_local_experts=6, num_experts_per_tok=2, routed_scaling_factor=2.0,
    index_n_heads=2, index_head_dim=16, index_block_size=BLOCK, index_topk_blocks=TOPK, index_local_blocks=LOCAL,
    layer_types=["full_attention", "minimax_m3_sparse", "minimax_m3_sparse", "full_attention"],
    mlp_layer_types=["dense", "sparse", "sparse", "sparse"], bos_token_id=None, eos_token_id=None, pad_token_id=None)
# A vision tower as small as transformers builds one: its tensors are written and never read.
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=2,
              image_size=8)

# The text model alone (transformers' MiniMaxM3VLForCausalLM: its own tensor names) and the multimodal release.
MINIMAX_M3_TEXT: Preset = ("MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM", TEXT)
MINIMAX_M3: Preset = ("MiniMaxM3VLConfig", "MiniMaxM3SparseForConditionalGeneration", dict(TEXT, vision_config=VISION))

ARCHS = {
    "minimax_m3": TinyArch("MiniMaxM3SparseForConditionalGeneration", "MiniMax-M3 (its text model)", ("float", "fp8"),
                           write=preset_writer(MINIMAX_M3, drawn=True), expert_width="intermediate_size"),
    # vLLM's text-only MiniMax-M3 (MiniMaxM3SparseForCausalLM): the release's text model alone, in its published
    # names (block_sparse_moe.experts.{e}.w1 / w3 / w2, the indexer's index_* projections) under model. / lm_head.
    "minimax_m3_text": TinyArch("MiniMaxM3SparseForCausalLM", "MiniMax-M3's text model alone (vLLM's name)",
                                ("float",), expert_width="intermediate_size",
                                write=published_as(preset_writer(MINIMAX_M3, drawn=True), "MiniMaxM3SparseForCausalLM",
                                                   text_only=True)),
}

__all__ = ["ARCHS", "BLOCK", "LOCAL", "MINIMAX_M3", "MINIMAX_M3_TEXT", "TEXT", "TOPK", "VISION"]
